"""Log parsers and the averaging rule: the seed's example lines, every format, every edge case of
REFERENCE.md section 4, each with a log written for it in tmp_path."""

from __future__ import annotations

import math
import random
import re
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
from qwen_pretrain.benchmarks.logparse import FORMATS, iter_records, parse_line, parse_number
from qwen_pretrain.benchmarks.runs import Derivation, averaging_window, parse_run
from qwen_pretrain.benchmarks.synthetic import (
    HEADERS,
    LINE_OF_FORMAT,
    NOISE,
    Step,
    megatron_line,
    nemo_line,
    ours_line,
    run_steps,
    write_run,
)

# The seed's canonical lines (REFERENCE.md section 4), typed out verbatim.
NEMO_SEED = (
    "[2025-10-17T11:33:02+08:00] Training epoch 0, iteration 528/999 | lr: 0.0001754 | global_batch_size: 32 "
    "| global_step: 528 | reduced_train_loss: 3.06 | train_step_timing in s: 2.443 | tokens_per_sec_per_gpu: "
    "6.706e+03 | consumed_samples: 16928 | val_loss: 3.624"
)
MEGATRON_SEED = (
    " [2025-10-17 11:33:02] iteration      528/     999 | consumed samples:        16928 | elapsed time per "
    "iteration (ms): 2443.1 | throughput per GPU (TFLOP/s/GPU): 401.2 | learning rate: 1.754000E-04 | global "
    "batch size:    32 | lm loss: 3.060000E+00 | loss scale: 1.0 | grad norm: 1.234 | number of skipped "
    "iterations:   0 | number of nan iterations:   0 |"
)
# Megatron-Bridge's training_log prints the Megatron-LM fields (train_utils.py); its start-up logs
# carry the `megatron.bridge` logger names.
BRIDGE_SEED = (
    "INFO:megatron.bridge.training.train:Starting training loop\n"
    " [2025-10-17 11:33:02] iteration      528/     999 | consumed samples:        16928 | elapsed time per "
    "iteration (ms): 2443.1 | throughput per GPU (TFLOP/s/GPU): 401.2 | learning rate: 1.754000E-04 | global "
    "batch size:    32 | lm loss: 3.060000E+00 | loss scale: 1.0 | grad norm: 1.234 | number of skipped "
    "iterations:   0 | number of nan iterations:   0 |"
)
# nanotron's LoggerWriter with human_format values and its dimmed logging prefix.
NANOTRON_SEED = (
    "\x1b[2;3m10/17 11:33:02 [INFO|DP=0|PP=0|TP=0]\x1b[0m: iteration: 528 / 1000 | consumed_tokens: 69.3M | "
    "elapsed_time_per_iteration_ms: 2.44K | tokens_per_sec: 53.6K | tokens_per_sec_per_gpu: 6.71K | "
    "global_batch_size: 32 | lm_loss: 3.06 | lr: 0.000175 | model_tflops_per_gpu: 401 | "
    "hardware_tflops_per_gpu: 401 | grad_norm: 1.23"
)
# ModelLink / MindSpeed README's training log line, with the old `gloabl` misspelling.
MINDSPEED_SEED = (
    " iteration  11/50000 | consumed samples: 5632 | consumed tokens:  11534336 | elapsed time per iteration "
    "(ms):  52728.1 | learning rate:    1.499E-05 | gloabl batch size:  512 | lm loss:  1.376514E+01 | loss "
    "scale:  65536.0 | grad norm:    459.628 | actual seqlen:  2048 | number of skipped iterations: 0 | number "
    "of nan iterations:   0 | samples per second: 9.710 | TFLOPs: 167.52 |"
)


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    return path


def records(path: Path, fmt: str = "auto"):
    scan, recs = iter_records(path, fmt)
    out = list(recs)
    return scan, out


def steps_of(n: int, **kw) -> list[Step]:
    return list(run_steps(n, **kw))


# --- the seed's example lines -------------------------------------------------------------------

def test_nemo_seed_line_parses_to_its_values(tmp_path):
    scan, [r] = records(write(tmp_path / "nemo.log", NEMO_SEED + "\n"))
    assert scan.format == "nemo"
    assert (r.step, r.loss, r.step_time_s, r.tokens_per_sec_per_gpu) == (528, 3.06, 2.443, 6706.0)
    assert (r.global_batch_size, r.lr, r.val_loss, r.line_no) == (32, 0.0001754, 3.624, 1)


def test_megatron_seed_line_parses_to_its_values(tmp_path):
    path = write(tmp_path / "megatron.log", MEGATRON_SEED + "\n")
    scan, [r] = records(path)
    assert scan.format == "megatron"
    assert (r.step, r.loss, r.tflops_per_gpu, r.global_batch_size, r.lr) == (528, 3.06, 401.2, 32, 1.754e-4)
    assert r.step_time_s == pytest.approx(2.4431)
    assert r.tokens_per_sec_per_gpu is None  # Megatron-LM prints none: it must be derived
    run = parse_run(path, allow_short=True, derivation=Derivation(seq_length=4096, gpus=8))
    assert run.tokens_per_sec_per_gpu_derived is True
    assert run.tokens_per_sec_per_gpu_mean == pytest.approx(4096 * 32 / 2.4431 / 8)
    # ... which is the NeMo line's 6.706e+03 for the same step: the two seed lines agree.
    assert run.tokens_per_sec_per_gpu_mean == pytest.approx(6706, rel=1e-3)


def test_bridge_seed_line_is_reported_as_bridge(tmp_path):
    scan, [r] = records(write(tmp_path / "bridge.log", BRIDGE_SEED + "\n"))
    assert scan.format == "bridge"
    assert (r.step, r.loss, r.global_batch_size) == (528, 3.06, 32)
    assert r.step_time_s == pytest.approx(2.4431)


def test_nanotron_seed_line_with_k_m_suffixes(tmp_path):
    scan, [r] = records(write(tmp_path / "nanotron.log", NANOTRON_SEED + "\n"))
    assert scan.format == "nanotron"
    assert r.step == 528
    assert r.step_time_s == pytest.approx(2.44)  # 2.44K ms
    assert r.tokens_per_sec_per_gpu == pytest.approx(6710.0)  # 6.71K
    assert (r.global_batch_size, r.loss, r.tflops_per_gpu, r.lr) == (32, 3.06, 401.0, 0.000175)


def test_mindspeed_misspelled_gloabl_batch_size(tmp_path):
    scan, [r] = records(write(tmp_path / "mindspeed.log", MINDSPEED_SEED + "\n"))
    assert scan.format == "mindspeed"
    assert (r.step, r.global_batch_size, r.seq_length, r.tflops_per_gpu) == (11, 512, 2048, 167.52)
    assert r.loss == pytest.approx(13.76514)
    assert r.step_time_s == pytest.approx(52.7281)


def test_synthetic_lines_reproduce_the_seed_lines():
    """The generator used by the other tests prints exactly the seed's lines."""
    assert nemo_line(Step(528, 1000, 3.06, 2.443, 32, 4096, 8, val_loss=3.624, tokens_per_sec=6706)) == NEMO_SEED
    assert megatron_line(Step(528, 999, 3.06, 2.4431, 32, 4096, 8, tflops=401.2)) == MEGATRON_SEED


def test_parse_number_forms():
    assert parse_number(b"6.706e+03") == 6706.0
    assert parse_number(b" 1.754000E-04 ") == 1.754e-4
    assert parse_number(b"3.1e+4") == 31000.0
    assert parse_number(b"12.9K") == pytest.approx(12900.0)
    assert parse_number(b"69.3M") == pytest.approx(69.3e6)
    assert parse_number(b"1.2B") == pytest.approx(1.2e9)
    assert math.isnan(parse_number(b"nan"))
    assert parse_number(b" 3.624[rank0]: Training epoch 0, ") == 3.624
    assert parse_number(b" n/a ") is None


# --- every format, auto-detected, through the whole rule ----------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_is_detected_and_averaged(tmp_path, fmt):
    steps = steps_of(30)
    path = write_run(tmp_path / f"{fmt}.log", fmt, steps, noise_every=7)
    # Megatron-LM's argument dump gives seq length and world size; the others need --gpus.
    derivation = Derivation() if fmt in ("nemo", "ours", "nanotron", "megatron") else Derivation(seq_length=4096, gpus=8)
    run = parse_run(path, derivation=derivation)
    assert run.format == fmt
    assert run.status == "ok", run.reason
    assert (run.steps, run.first_step, run.last_step, run.final_step) == (30, 1, 30, 30)
    assert (run.steps_used, run.window_first_step, run.window_last_step) == (10, 11, 20)
    expected = statistics.mean(s.tokens_per_sec_per_gpu for s in steps[10:20])
    assert run.tokens_per_sec_per_gpu_mean == pytest.approx(expected, rel=5e-3)
    assert run.tokens_per_sec_per_gpu_derived is (fmt in ("megatron", "bridge", "mindspeed"))
    assert run.step_time_mean_s == pytest.approx(statistics.mean(s.step_time_s for s in steps[10:20]), rel=5e-3)
    assert run.final_loss == pytest.approx(steps[-1].loss, rel=5e-3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_explicit_format_matches_auto(tmp_path, fmt):
    path = write_run(tmp_path / f"{fmt}.log", fmt, steps_of(25))
    auto = parse_run(path, derivation=Derivation(seq_length=4096, gpus=8))
    forced = parse_run(path, fmt=fmt, derivation=Derivation(seq_length=4096, gpus=8))
    assert forced.format == fmt
    assert forced.tokens_per_sec_per_gpu_mean == auto.tokens_per_sec_per_gpu_mean
    assert forced.final_loss == auto.final_loss


def test_ours_detected_by_marker_or_by_its_extra_fields(tmp_path):
    steps = steps_of(22)
    # our trainer's line (NeMo fields + tflops_per_gpu), no marker line
    plain = write(tmp_path / "ours.log", "\n".join(ours_line(s) for s in steps) + "\n")
    run = parse_run(plain)
    assert run.format == "ours"
    assert run.tflops_per_gpu_mean == pytest.approx(statistics.mean(s.tflops_per_gpu for s in steps[10:12]), rel=1e-3)
    # a NeMo line after our marker line is ours too; without it, NeMo
    marked = write(tmp_path / "marked.log", "[qwen-pretrain-trainer] start\n" + "\n".join(nemo_line(s) for s in steps))
    assert parse_run(marked).format == "ours"
    nemo = write(tmp_path / "nemo.log", "\n".join(nemo_line(s) for s in steps))
    assert parse_run(nemo).format == "nemo"


def test_explicit_wrong_format_finds_no_steps(tmp_path):
    path = write_run(tmp_path / "nemo.log", "nemo", steps_of(25))
    run = parse_run(path, fmt="megatron")
    assert run.status == "unusable" and "no megatron training step lines" in run.reason


# --- the averaging rule -------------------------------------------------------------------------

def test_averaging_window_rule():
    assert averaging_window(21) == slice(10, 11)
    assert averaging_window(20) is None
    assert averaging_window(1000) == slice(10, 990)
    assert averaging_window(5, 2, 2) == slice(2, 3)
    assert averaging_window(3, 0, 0) == slice(0, 3)


def test_slow_first_step_and_save_spike(tmp_path):
    """The slow first step falls outside the window; a save spike inside it counts (the rule is simple)."""
    steps = steps_of(150)  # step 1 is 6x slower; step 100 saves a checkpoint (3x)
    path = write_run(tmp_path / "nemo.log", "nemo", steps)
    run = parse_run(path)
    window = steps[10:140]
    assert run.tokens_per_sec_per_gpu_mean == pytest.approx(statistics.mean(s.tokens_per_sec_per_gpu for s in window), rel=1e-3)
    all_mean = statistics.mean(s.tokens_per_sec_per_gpu for s in steps)
    assert run.tokens_per_sec_per_gpu_mean != pytest.approx(all_mean, rel=1e-3)
    # configurable: keep the first step and the result changes
    run0 = parse_run(path, skip_first=0, skip_last=0)
    assert run0.steps_used == 150
    assert run0.tokens_per_sec_per_gpu_mean == pytest.approx(all_mean, rel=1e-3)


def test_repeated_steps_after_restart_keep_the_last_occurrence(tmp_path):
    first = steps_of(30, seed=1)
    # the job died after step 30 and restarted from the checkpoint at step 20: 21..40 again,
    # with other numbers (another node, another speed)
    second = list(run_steps(20, first=21, seed=2, base_step_time=3.0))
    text = "\n".join(nemo_line(s) for s in first) + "\n[NeMo I] Restoring checkpoint\n"
    text += "\n".join(nemo_line(s) for s in second) + "\n"
    run = parse_run(write(tmp_path / "restart.log", text))
    assert run.steps == 40 and run.final_step == 40
    merged = first[:20] + second
    assert [s.step for s in merged] == list(range(1, 41))
    expected = statistics.mean(s.tokens_per_sec_per_gpu for s in merged[10:30])
    assert run.tokens_per_sec_per_gpu_mean == pytest.approx(expected, rel=1e-3)
    assert run.final_loss == pytest.approx(second[-1].loss, rel=1e-3)
    assert any("10 repeated step line(s)" in w and "last occurrence" in w for w in run.warnings)


def test_short_run_is_unusable_unless_allowed(tmp_path):
    steps = steps_of(15)
    path = write_run(tmp_path / "short.log", "nemo", steps)
    run = parse_run(path)
    assert run.status == "unusable"
    assert "only 15 unique steps" in run.reason and "at least 21" in run.reason
    assert run.tokens_per_sec_per_gpu_mean is None  # never a mean over a window that does not exist
    allowed = parse_run(path, allow_short=True)
    assert allowed.status == "ok" and allowed.steps_used == 15
    assert allowed.tokens_per_sec_per_gpu_mean == pytest.approx(statistics.mean(s.tokens_per_sec_per_gpu for s in steps), rel=1e-3)


# --- edge cases of REFERENCE.md section 4 -------------------------------------------------------

def test_fields_in_any_order_and_absent_fields(tmp_path):
    lines = [
        "Training epoch 0, iteration 1/9 | global_step: 1 | tokens_per_sec_per_gpu: 100 | reduced_train_loss: 5.0",
        "Training epoch 0, iteration 2/9 | reduced_train_loss: 4.0 | lr: 1e-4 | train_step_timing in s: 2.0 "
        "| global_step: 2 | tokens_per_sec_per_gpu: 200",
        "Training epoch 0, iteration 3/9 | tokens_per_sec_per_gpu: 300 | global_batch_size: 8 | global_step: 3",
    ]
    _, recs = records(write(tmp_path / "order.log", "\n".join(lines)))
    assert [(r.step, r.loss, r.tokens_per_sec_per_gpu) for r in recs] == [(1, 5.0, 100.0), (2, 4.0, 200.0), (3, None, 300.0)]
    assert (recs[1].step_time_s, recs[1].lr, recs[2].global_batch_size, recs[0].step_time_s) == (2.0, 1e-4, 8, None)


def test_scientific_notation_anywhere(tmp_path):
    line = ("Training epoch 0, iteration 31000/99999 | lr: 1.5E-04 | global_batch_size: 3.2e+01 | global_step: 3.1e+4 "
            "| reduced_train_loss: 3.06e+00 | train_step_timing in s: 2.443E+00 | tokens_per_sec_per_gpu: 6.859e+03")
    _, [r] = records(write(tmp_path / "sci.log", line))
    assert (r.step, r.global_batch_size, r.loss, r.step_time_s, r.tokens_per_sec_per_gpu, r.lr) == (
        31000, 32, 3.06, 2.443, 6859.0, 1.5e-4)


def test_consumed_samples_missing_on_the_first_line(tmp_path):
    steps = steps_of(25)
    lines = [nemo_line(s) for s in steps]
    lines[0] = lines[0].replace(f" | consumed_samples: {steps[0].consumed_samples}", "")
    assert "consumed_samples" not in lines[0]
    run = parse_run(write(tmp_path / "first.log", "\n".join(lines)))
    assert run.status == "ok" and run.steps == 25 and run.first_step == 1


def test_nan_and_skipped_steps_print_no_loss(tmp_path):
    steps = steps_of(25)
    lines = [megatron_line(s) for s in steps]
    lines[5] = lines[5].replace(f" lm loss: {steps[5].loss:.6E} |", "")  # skipped iteration: no loss
    lines[6] = lines[6].replace(f"lm loss: {steps[6].loss:.6E}", "lm loss: nan")
    path = write(tmp_path / "nan.log", "\n".join(lines))
    _, recs = records(path)
    assert recs[5].loss is None and math.isnan(recs[6].loss)
    run = parse_run(path, derivation=Derivation(seq_length=4096, gpus=8))
    assert run.status == "ok"
    assert any("2 step(s) with no loss or a NaN loss" in w for w in run.warnings)
    # a NaN loss at the final step makes the log unusable for the accuracy check
    lines[-1] = lines[-1].replace(f"lm loss: {steps[-1].loss:.6E}", "lm loss: nan")
    bad = parse_run(write(tmp_path / "nan_final.log", "\n".join(lines)), derivation=Derivation(seq_length=4096, gpus=8))
    assert bad.status == "unusable" and "final step 25" in bad.reason and "NaN" in bad.reason
    assert bad.to_json()["final_loss"] is None


def test_rank_prefixes_and_ranks_repeating_lines(tmp_path):
    steps = steps_of(25)
    lines = []
    for s in steps:
        lines.append("[rank3]: " + nemo_line(s, timestamp=""))
        lines.append("[default0]:" + nemo_line(s))
    run = parse_run(write(tmp_path / "ranks.log", "\n".join(lines)))
    assert run.steps == 25 and run.final_step == 25
    assert any("25 repeated step line(s)" in w for w in run.warnings)
    assert run.tokens_per_sec_per_gpu_mean == pytest.approx(statistics.mean(s.tokens_per_sec_per_gpu for s in steps[10:15]), rel=1e-3)


def test_two_records_glued_on_one_line(tmp_path):
    steps = steps_of(25)
    nemo = [nemo_line(s) for s in steps]
    glued_nemo = nemo[:10] + [nemo[10] + "[rank0]: " + nemo[11]] + nemo[12:]  # no newline between two records
    _, recs = records(write(tmp_path / "glued_nemo.log", "\n".join(glued_nemo)))
    assert [r.step for r in recs] == list(range(1, 26))
    assert recs[10].tokens_per_sec_per_gpu == pytest.approx(steps[10].tokens_per_sec_per_gpu, rel=1e-3)
    assert recs[10].line_no == recs[11].line_no == 11
    meg = [megatron_line(s) for s in steps]
    glued_meg = meg[:3] + [meg[3] + meg[4]] + meg[5:]
    _, recs = records(write(tmp_path / "glued_meg.log", "\n".join(glued_meg)))
    assert [r.step for r in recs] == list(range(1, 26))
    assert recs[3].loss == pytest.approx(steps[3].loss) and recs[4].loss == pytest.approx(steps[4].loss)


def test_carriage_return_progress_bars_and_ansi_colours(tmp_path):
    steps = steps_of(25)
    lines = []
    for s in steps:
        bar = f"Epoch 0: {s.step * 4}%|\u2588\u2588     | {s.step}/25 [00:{s.step:02d}<00:10, reduced_train_loss=9.99]"
        coloured = nemo_line(s).replace("reduced_train_loss:", "\x1b[1;32mreduced_train_loss\x1b[0m:")
        lines.append(f"\r{bar}\r{coloured}\r{bar}")
    run = parse_run(write(tmp_path / "bars.log", "\n".join(lines) + "\n"))
    assert run.steps == 25
    assert run.final_loss == pytest.approx(steps[-1].loss, rel=1e-3)  # not the bar's 9.99


def test_non_utf8_bytes(tmp_path):
    steps = steps_of(25)
    data = b"\xff\xfe\x80 garbage \xc3\x28 from a crashed rank\n"
    for s in steps:
        data += b"[rank\xff0]: " + nemo_line(s).encode() + b"\n" + b"\x8f\x90\xa0\n"
    run = parse_run(write(tmp_path / "bytes.log", data))
    assert run.status == "ok" and run.steps == 25
    assert run.final_loss == pytest.approx(steps[-1].loss, rel=1e-3)


def test_megatron_args_dump_gives_derivation_inputs(tmp_path):
    steps = steps_of(25, seq_length=8192, gpus=16)
    header = "  seq_length ...................................... 8192\n  world_size ...................................... 16\n"
    path = write(tmp_path / "m.log", header + "\n".join(megatron_line(s) for s in steps))
    run = parse_run(path)
    assert (run.seq_length, run.gpus, run.global_batch_size) == (8192, 16, 32)
    assert run.tokens_per_sec_per_gpu_derived
    assert any("read from the log" in w for w in run.warnings)
    # the command line wins over the log
    run2 = parse_run(path, derivation=Derivation(seq_length=4096, gpus=8, global_batch_size=32))
    assert run2.tokens_per_sec_per_gpu_mean == pytest.approx(run.tokens_per_sec_per_gpu_mean, rel=1e-9)  # 4096*32/8 == 8192*32/16
    assert (run2.seq_length, run2.gpus) == (4096, 8)
    run3 = parse_run(path, derivation=Derivation(global_batch_size=64))
    assert run3.tokens_per_sec_per_gpu_mean == pytest.approx(2 * run.tokens_per_sec_per_gpu_mean, rel=1e-9)


def test_megatron_without_derivation_inputs_has_no_mean(tmp_path):
    path = write(tmp_path / "m.log", "\n".join(megatron_line(s) for s in steps_of(25)))
    run = parse_run(path)
    assert run.tokens_per_sec_per_gpu_mean is None and not run.tokens_per_sec_per_gpu_derived
    assert any("--seq-length, --gpus" in w for w in run.warnings)


def test_fast_path_layouts_give_the_same_table_as_the_by_key_path(tmp_path, monkeypatch):
    """Learned line layouts are only a shortcut: with them switched off every value is the same."""
    from qwen_pretrain.benchmarks import logparse

    steps = steps_of(40)
    text = "\n".join(nemo_line(s) for s in steps[:20])
    text += "\n" + "\n".join(nemo_line(replace(s, val_loss=3.5)) for s in steps[20:30])  # a 2nd layout
    text += "\n" + "\n".join(megatron_line(s).replace("lm loss", "other") for s in steps[30:32])  # not NeMo
    text += "\n" + "\n".join(nemo_line(s).replace("| lr:", "| lr: 12.9K | x:") for s in steps[30:40])  # suffix, extra field
    glued = [nemo_line(s) for s in steps_of(30, seed=5)]
    glued[12] = glued[12] + "[rank1]: " + glued[13]  # a glued pair inside the main layout's run
    glued[20] = "\rEpoch 0: 50%|#####| 20/30\r" + glued[20] + "\r"
    meg = [megatron_line(s) for s in steps_of(30, seed=6)]
    meg[15] = meg[15].replace(" lm loss:", " other loss: 1.0 | lm loss:")  # a second Megatron layout
    meg[16] = meg[16] + meg[17]
    logs = [write(tmp_path / "mixed.log", text), write(tmp_path / "glued.log", "\n".join(glued)),
            write(tmp_path / "meg.log", "\n".join(meg))]
    logs += [write_run(tmp_path / f"{fmt}.log", fmt, steps_of(30), noise_every=3) for fmt in FORMATS]
    nan_loss = [nemo_line(s) for s in steps_of(30, seed=7)]
    for i in (14, 15):  # a printed nan (not None) inside the main layout's run
        nan_loss[i] = re.sub(r"reduced_train_loss: \S+", "reduced_train_loss: nan", nan_loss[i])
    logs.append(write(tmp_path / "nan.log", "\n".join(nan_loss)))
    derivation = Derivation(seq_length=4096, gpus=8)
    for path in logs:
        for block_bytes in (1500, logparse.BLOCK_BYTES):
            # small blocks: records sit on block boundaries; the column path runs from the line
            # after the first learned layout on, in the first block as in later ones
            monkeypatch.setattr(logparse, "BLOCK_BYTES", block_bytes)
            fast = parse_run(path, allow_short=True, derivation=derivation)
            fast_records = list(iter_records(path)[1])
            monkeypatch.undo()
            monkeypatch.setattr(logparse, "MAX_LAYOUTS", 0)  # no layout: every record by key
            slow = parse_run(path, allow_short=True, derivation=derivation)
            slow_records = list(iter_records(path)[1])
            monkeypatch.undo()
            assert list(fast.table.steps) == list(slow.table.steps), path.name
            assert fast.table.data.tobytes() == slow.table.data.tobytes(), path.name
            assert fast.to_json() == slow.to_json()
            # line numbers, and None (not printed) against nan (printed nan), record by record
            assert [repr(r) for r in fast_records] == [repr(r) for r in slow_records], path.name
    assert any(r.loss is not None and math.isnan(r.loss) for r in iter_records(logs[-1])[1])


def _random_log(path: Path, seed: int) -> Path:
    """A log of a random format with the odd lines big logs have, at random places."""
    rng = random.Random(seed)
    fmt = rng.choice(sorted(LINE_OF_FORMAT))
    steps = list(run_steps(rng.randint(5, 300), seed=seed))
    lines = list(HEADERS[fmt])
    for i, s in enumerate(steps):
        if rng.random() < 0.1:
            s = replace(s, val_loss=3.5)  # a second layout
        if rng.random() < 0.03:
            s = replace(s, loss=float("nan"))
        line = LINE_OF_FORMAT[fmt](s)
        r = rng.random()
        if r < 0.02 and len(lines) > len(HEADERS[fmt]):
            lines[-1] += "[rank1]: " + line  # glued to the line before
            continue
        if r < 0.04:
            line = "\rEpoch 0: 50%|#####| 20/30\r" + line + "\r"
        elif r < 0.06:
            line = f"[rank{rng.randint(0, 7)}]: " + line
        elif r < 0.08:
            line = line.replace("|", "\x1b[32m|\x1b[0m", 2)
        elif r < 0.09:
            line = line.replace(" | ", " |  ", 3)
        elif r < 0.10:
            line += " | extra key: 1 2"
        elif r < 0.11:
            line = line.replace(": ", ": 12.5K ", 1)
        lines.append(line)
        if rng.random() < 0.05:
            lines.extend(rng.sample(NOISE, 2))
        if rng.random() < 0.01:  # a restart: some steps again
            lines.extend(LINE_OF_FORMAT[fmt](x) for x in steps[max(0, i - 5):i])
    path.write_bytes(("\n".join(lines) + ("\n" if rng.random() < 0.5 else "")).encode())
    return path


@pytest.mark.parametrize("block_bytes", [300, 1500, 1 << 22])
def test_random_logs_column_path_equals_record_by_record(tmp_path, monkeypatch, block_bytes):
    """Fuzz: on 40 random logs the column path gives what parsing every record by key gives."""
    from qwen_pretrain.benchmarks import logparse

    for seed in range(40):
        path = _random_log(tmp_path / f"{seed}.log", seed)
        results = []
        for max_layouts in (logparse.MAX_LAYOUTS, 0):
            monkeypatch.setattr(logparse, "BLOCK_BYTES", block_bytes)
            monkeypatch.setattr(logparse, "MAX_LAYOUTS", max_layouts)
            scan, records = iter_records(path)
            records = [repr(r) for r in records]
            run = parse_run(path, allow_short=True, derivation=Derivation(seq_length=4096, gpus=8))
            results.append((records, run.to_json(), scan.lines, scan.format))
            monkeypatch.undo()
        assert results[0] == results[1], f"seed {seed}"


def test_nemo_log_without_tokens_per_sec_can_be_derived(tmp_path):
    """NeMo's plain TimingCallback prints no tokens/s: derive it when the user passes the inputs."""
    steps = steps_of(25)
    lines = [nemo_line(s).replace(f" | tokens_per_sec_per_gpu: {s.tokens_per_sec_per_gpu:.4}", "") for s in steps]
    path = write(tmp_path / "plain.log", "\n".join(lines))
    run = parse_run(path)
    assert run.tokens_per_sec_per_gpu_mean is None
    assert any("TimingCallback(log_tokens_per_sec=True)" in w and "--seq-length, --gpus" in w for w in run.warnings)
    run = parse_run(path, derivation=Derivation(seq_length=4096, gpus=8))
    assert run.tokens_per_sec_per_gpu_derived
    assert run.tokens_per_sec_per_gpu_mean == pytest.approx(statistics.mean(s.tokens_per_sec_per_gpu for s in steps[10:15]), rel=1e-3)


def test_parse_line_by_format():
    [r] = parse_line(NEMO_SEED)
    assert (r.step, r.loss, r.tokens_per_sec_per_gpu) == (528, 3.06, 6706.0)
    [r] = parse_line(MINDSPEED_SEED, "mindspeed")
    assert (r.step, r.global_batch_size, r.seq_length) == (11, 512, 2048)
    glued = parse_line(NEMO_SEED + "[rank1]: " + NEMO_SEED.replace("global_step: 528", "global_step: 529"))
    assert [r.step for r in glued] == [528, 529] and glued[0].val_loss == 3.624
    assert parse_line("validation loss at iteration 500 | lm loss value: 3.1 |") == []
    assert parse_line(MEGATRON_SEED, "nemo") == []  # the wrong format's keys find nothing


def test_our_trainers_own_formatter_is_parsed_as_ours(tmp_path):
    """Lines written by the trainer's formatter (training/train_log.py) itself, skipped step included."""
    train_log = pytest.importorskip("qwen_pretrain.training.train_log")
    lines = []
    for step in range(25):
        rec = train_log.StepMetrics(
            step=step, train_steps=25, lr=3e-4, global_batch_size=8, loss=11.5 - step * 0.01,
            step_time_s=3.2 + (2.0 if step == 0 else 0.0), tokens_per_sec_per_gpu=150.0 + step,
            consumed_samples=8 * (step + 1), val_loss=11.51 if step >= 10 else None, tflops_per_gpu=0.009,
            skipped=(step == 7))
        lines.append(train_log.nemo_line(rec))
        if step == 10:
            lines.append(train_log.validation_line(10, 11.51))
    run = parse_run(write(tmp_path / "ours.log", "\n".join(lines) + "\n"))
    assert run.format == "ours" and run.status == "ok"
    assert (run.steps, run.first_step, run.final_step) == (25, 0, 24)
    assert run.final_loss == pytest.approx(11.5 - 24 * 0.01, rel=1e-3)
    assert run.tokens_per_sec_per_gpu_mean == pytest.approx(statistics.mean(150.0 + s for s in range(10, 15)), rel=1e-3)
    assert any("1 step(s) with no loss" in w for w in run.warnings)  # the skipped step prints no loss
