"""The measuring harness of the performance scripts, and the sized logs the parse benchmark writes."""

from __future__ import annotations

import re
import sys

import pytest
from qwen_pretrain.benchmarks import parse_bench
from qwen_pretrain.benchmarks.harness import compare, load_average, load_text, run_child
from qwen_pretrain.benchmarks.runs import parse_run
from qwen_pretrain.benchmarks.synthetic import BIG_LOG_NOISE, HEADERS, run_steps, write_sized_run

MB = 1 << 20


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def spawn(code: str, copies: int = 1) -> str:
    """Python source of a child that runs `code` in `copies` grandchildren at once and waits for them."""
    return (
        "import subprocess, sys\n"
        f"procs = [subprocess.Popen([sys.executable, '-c', {code!r}]) for _ in range({copies})]\n"
        "sys.exit(max(p.wait() for p in procs))\n"
    )


# --- run_child: exit code, time, output ----------------------------------------------------------


def test_exit_code_wall_time_and_output_are_reported():
    run = run_child(python("import sys, time; print('out'); print('err', file=sys.stderr); time.sleep(0.3); sys.exit(3)"))
    assert run.exit_code == 3 and not run.ok
    assert 0.3 <= run.wall_s < 10
    assert (run.stdout, run.stderr) == ("out\n", "err\n")
    assert 0 < run.cpu_s < run.wall_s  # it slept


def test_merged_output_and_last_line():
    run = run_child(python("import sys; print('a'); print('b', file=sys.stderr, flush=True); print('1.5')"),
                    merge_stderr=True)
    assert run.ok and run.stderr == ""
    assert run.stdout.splitlines() == ["a", "b", "1.5"] and run.last_stdout_line() == "1.5"


def test_cpu_time_of_a_busy_grandchild_is_counted():
    run = run_child(python(spawn("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass")))
    assert run.ok and run.cpu_s >= 0.45


def test_a_killed_child_reads_as_the_negative_signal():
    assert run_child(python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")).exit_code == -9


def test_env_and_cwd_reach_the_child(tmp_path):
    run = run_child(python("import os; print(os.environ['BENCH_X'], os.getcwd())"),
                    env={"BENCH_X": "42", "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert run.stdout.split() == ["42", str(tmp_path)]


def test_a_command_that_cannot_start_raises_like_subprocess(tmp_path):
    with pytest.raises(FileNotFoundError):
        run_child([str(tmp_path / "no-such-program")])


# --- run_child: peak RSS of the tree -------------------------------------------------------------


def test_peak_rss_of_a_grandchild_is_seen():
    run = run_child(python(spawn("import time; b = b'x' * (200 << 20); time.sleep(0.5)")))
    assert run.ok
    assert run.peak_rss_bytes >= 150 * MB


def test_workers_side_by_side_are_summed():
    """Two grandchildren of 120 MB at once: more than any single process ever held."""
    run = run_child(python(spawn("import time; b = b'x' * (120 << 20); time.sleep(1.5)", copies=2)))
    assert run.ok
    assert run.peak_rss_bytes >= 200 * MB


def test_a_spike_shorter_than_the_sampling_interval_is_seen():
    run = run_child(python(spawn("b = b'x' * (200 << 20)")))
    assert run.peak_rss_bytes >= 150 * MB


def test_the_parents_memory_is_not_counted():
    """The kernel carries the forking process's high-water mark into its child: a big parent must
    not show up in a small child's figure."""
    held = b"x" * (300 * MB)
    run = run_child(python("pass"))
    assert len(held) == 300 * MB
    assert run.ok and run.peak_rss_bytes < 100 * MB


# --- load average and the same-run comparison ----------------------------------------------------


def test_load_average_and_its_text():
    assert len(load_average()) == 3
    assert load_text((0.5, 1.25, 12.0)) == "0.50 1.25 12.00"
    assert re.fullmatch(r"\d+\.\d\d \d+\.\d\d \d+\.\d\d", load_text())


def test_compare_runs_round_by_round_and_keeps_the_best_of_n():
    ours_speeds, base_speeds = iter([1.0, 3.0, 2.0]), iter([2.0, 1.0, 1.5])
    order: list[str] = []

    def measure(name, speeds):
        def run():
            order.append(name)
            return {"speed": next(speeds), "cpu_speed": 1.0 if name == "ours" else 4.0}
        return run

    seen: list[tuple[str, float]] = []
    comparison = compare({"ours": measure("ours", ours_speeds), "base": measure("base", base_speeds)},
                         speed=lambda r: r["speed"], repeats=3,
                         on_result=lambda name, r: seen.append((name, r["speed"])))
    assert order == ["ours", "base"] * 3
    assert seen == [("ours", 1.0), ("base", 2.0), ("ours", 3.0), ("base", 1.0), ("ours", 2.0), ("base", 1.5)]
    assert comparison.best["ours"]["speed"] == 3.0 and comparison.best["base"]["speed"] == 2.0
    assert comparison.ratio("ours", "base") == pytest.approx(1.5)
    assert comparison.ratio("ours", "base", speed=lambda r: r["cpu_speed"]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        compare({"ours": measure("ours", ours_speeds)}, speed=lambda r: r["speed"], repeats=0)


# --- sized logs (the parse benchmark's input) ----------------------------------------------------


def test_dense_sized_log_is_all_steps_of_about_the_size(tmp_path):
    path = tmp_path / "dense.log"
    size = 200_000
    count = write_sized_run(path, "nemo", run_steps(size, first=0), size)
    lines = path.read_text().splitlines()
    assert lines[: len(HEADERS["nemo"])] == HEADERS["nemo"]
    assert len(lines) == len(HEADERS["nemo"]) + count
    assert size <= path.stat().st_size < size + 400  # stops after the step that reaches the size
    run = parse_run(path)
    assert (run.status, run.steps, run.first_step, run.last_step) == ("ok", count, 0, count - 1)


def test_noisy_sized_log_spreads_the_steps_through_noise(tmp_path):
    path = tmp_path / "noisy.log"
    size = 2_000_000
    assert write_sized_run(path, "nemo", run_steps(1000, first=0, total=1000), size, noise=BIG_LOG_NOISE) == 1000
    assert abs(path.stat().st_size - size) < 1000
    text = path.read_bytes().decode()  # not read_text: it would turn the progress bars' \r into \n
    assert all(line in text for line in BIG_LOG_NOISE)
    run = parse_run(path)
    assert (run.status, run.steps, run.final_step) == ("ok", 1000, 999)
    # the steps are spread: the last 10% of the bytes hold about the last 10% of the steps
    tail = text[int(len(text) * 0.9):]
    assert 90 <= tail.count("Training epoch 0, iteration") <= 110


@pytest.mark.parametrize("kind", ["dense", "noisy"])
def test_parse_bench_logs_give_ours_and_the_naive_script_the_same_mean(tmp_path, kind):
    path = tmp_path / f"{kind}.log"
    steps = parse_bench.generate(path, kind, 500_000)
    ours, naive = parse_bench.measure_ours(str(path)), parse_bench.measure_naive(str(path))
    assert ours["steps"] == naive["steps"] == steps
    assert ours["tps_mean"] == pytest.approx(naive["tps_mean"], rel=1e-9)
