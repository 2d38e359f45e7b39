"""`qwen-pretrain demo`: the end-to-end CPU demo, raw text to a verdict against a reference trainer.

1. Sample real text found on any machine with Python: the CPython standard library's sources
   (then /usr/share/doc if more is wanted), a few MB as jsonl, in sorted path order.
2. Tokenize it with the official Qwen tokenizer into Megatron .bin/.idx
   (`qwen_pretrain.preprocessing.pipeline.preprocess`).
3. Initial weights: a `transformers` Qwen3 model of `qwen3_tiny`'s shape, initialised by
   transformers itself (seed 1234) -> `init_hf/`, converted with `convert hf-to-mcore --tp 2`
   -> `init_mcore/`.
4. Ours: train `qwen3_tiny` with TP=2 on two CPU processes (torchrun + gloo, our Megatron-core
   trainer) from `init_mcore/` for 40 steps (`--steps`), validating every 20 -> `train.log`.
5. The reference: `qwen-pretrain train-reference`, an independent trainer (transformers model,
   torch AdamW, one process) from `init_hf/` on the same samples in the same order ->
   `reference.log`.
6. Judge ours against the reference (`benchmarks/reference_verdict.py`): `bench accept` of
   `train.log` with `reference.log` as the baseline (final loss within 5%), the largest per-step
   loss gap (same weights and batches: rounding only, tolerance 1e-3) and the throughput ratio.

Exit codes are `bench accept`'s: 0 passed, 1 failed, 2 unusable. Everything is built in a temp
directory renamed to `--out` (default demo_output/) at the end, so an interrupted demo never
leaves a complete-looking output; the report names the final paths.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.files import atomic_dir

RECIPE = "qwen3_tiny"
STEPS = 40
# The acceptance rule averages tokens/s without the first and last 10 steps: 21 leave one.
MIN_STEPS = 21
SAMPLE_BYTES = 3_000_000
OURS = "ours: Megatron-core, TP=2 on 2 CPU processes"
REFERENCE = "reference: transformers + torch AdamW, 1 process"


def text_sources() -> list[Path]:
    """Real text present on any machine with Python (stdlib sources first), in sorted order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    doc = Path("/usr/share/doc")
    if doc.is_dir():
        files += sorted(p for p in doc.rglob("*") if p.is_file() and p.suffix in ("", ".txt", ".md"))
    return files


def write_sample(out: Path, max_bytes: int = SAMPLE_BYTES) -> tuple[int, int]:
    """A jsonl of {"text": file contents}, up to `max_bytes` of text; returns (documents, bytes)."""
    docs = total = 0
    with out.open("w", encoding="utf-8") as f:
        for path in text_sources():
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            f.write(json.dumps({"text": text}) + "\n")
            docs += 1
            total += len(text.encode("utf-8"))
            if total >= max_bytes:
                break
    if docs == 0:
        raise UserError("demo: found no readable text under the Python stdlib or /usr/share/doc")
    return docs, total


def initial_weights(work: Path, tp: int) -> tuple[Path, Path]:
    """(init_hf, init_mcore): one set of starting weights in both trainers' formats."""
    from qwen_pretrain.benchmarks.reference_trainer import write_initial_weights
    from qwen_pretrain.conversion.convert import hf_to_mcore
    from qwen_pretrain.recipes import get_recipe

    recipe = get_recipe(RECIPE)
    init_hf = write_initial_weights(recipe.model, work / "init_hf", recipe.training.seed)
    init_mcore = hf_to_mcore(init_hf, work / "init_mcore", recipe=RECIPE, tp=tp, quiet=True)
    return init_hf, init_mcore


def stream(command: list[str], log: Path, env: dict[str, str], what: str) -> None:
    """Run `command`, echo and keep its stdout in `log` and its stderr beside it; a failure is
    a one-line error with the end of that stderr."""
    err_path = log.with_suffix(".stderr.log")
    with log.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            out.flush()
            print("  " + line.rstrip(), flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = err_path.read_text()[-3000:]
        raise UserError(f"demo: {what} failed (exit {rc}); last stderr:\n{tail}", exit_code=1)


def run_training(work: Path, data_prefix: str, steps: int, nproc: int, init: Path,
                 extra_args: tuple[str, ...] = ()) -> Path:
    """torchrun our trainer on CPU from `init`; returns the log path (metrics in work/train/)."""
    from qwen_pretrain.launch.train_cmd import local_torchrun_command

    argv = ["--recipe", RECIPE, "--data-path", data_prefix, "--train-steps", str(steps), "--load", str(init),
            "--log-dir", str(work / "train"), "--save", str(work / "checkpoints"), *extra_args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    log = work / "train.log"
    stream(local_torchrun_command(argv, nproc), log, env, "training")
    return log


def run_reference(work: Path, data_prefix: str, steps: int, init: Path) -> Path:
    """The reference trainer in one process using every core; returns the log path."""
    command = [sys.executable, "-m", "qwen_pretrain.launch.cli", "train-reference", "--recipe", RECIPE,
               "--init", str(init), "--data-path", data_prefix, "--train-steps", str(steps),
               "--log-dir", str(work / "reference")]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    # Idle OpenMP workers sleep instead of spinning: on shared cores a spinning worker burns the
    # time the other one waits for (measured: 2 threads took 3x longer than 1 under load 10).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    log = work / "reference.log"
    stream(command, log, env, "the reference run")
    return log


def judge(work: Path, nproc: int) -> Any:
    """Ours (`train.log`, `train/metrics.jsonl`) against the reference's files in `work`."""
    from qwen_pretrain.benchmarks.reference_verdict import RunFiles, judge_against_reference

    return judge_against_reference(
        RunFiles(work / "train.log", work / "train" / "metrics.jsonl", nproc),
        RunFiles(work / "reference.log", work / "reference" / "metrics.jsonl", 1),
    )


def write_report(work: Path, final: Path, judgement: Any, seconds: float) -> str:
    """report.txt, report.json and loss.png in `work`, every path named as it will be in `final`."""
    from qwen_pretrain.benchmarks import reference_verdict as rv
    from qwen_pretrain.benchmarks.reference_trainer import read_losses

    rv.write_loss_plot(read_losses(work / "train" / "metrics.jsonl"),
                       read_losses(work / "reference" / "metrics.jsonl"), work / "loss.png", OURS, REFERENCE)
    files = {name: str(final / name) for name in
             ("train.log", "reference.log", "loss.png", "init_hf", "init_mcore", "checkpoints", "data")}
    o, r = judgement.ours, judgement.reference
    text = "\n".join([
        f"ours:      {files['train.log']} ({o.format} format, {o.steps} steps; Megatron-core {RECIPE}, TP=2, "
        "2 CPU processes)",
        f"reference: {files['reference.log']} ({r.format} format, {r.steps} steps; transformers "
        "Qwen3ForCausalLM, torch AdamW, 1 process)",
        f"same initial weights: {files['init_hf']} (transformers init, seed 1234) = {files['init_mcore']} "
        "(convert hf-to-mcore --tp 2); same batches: megatron-core GPTDataset order, seed 1234",
        f"loss curves: {files['loss.png']}",
        rv.judgement_text(judgement, "train.log", "reference.log"),
    ])
    (work / "report.txt").write_text(text + "\n")
    report = {
        **rv.judgement_json(judgement),
        "ours": {**o.to_json(), "path": files["train.log"], "stack": OURS},
        "reference": {**r.to_json(), "path": files["reference.log"], "stack": REFERENCE},
        "files": files,
        "seconds": seconds,
    }
    (work / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return text


def run_demo(args: argparse.Namespace) -> int:
    from qwen_pretrain.preprocessing.pipeline import preprocess
    from qwen_pretrain.recipes import get_recipe

    if args.steps < MIN_STEPS:
        raise UserError(f"--steps {args.steps}: give at least {MIN_STEPS} (the acceptance rule drops the "
                        "first and last 10 steps from the tokens/s mean)")
    tp = get_recipe(RECIPE).parallel.tp
    final = Path(args.out).resolve()
    started = time.perf_counter()
    # The whole demo works in a temporary directory beside `final` that replaces an older demo
    # output only once the report is written; a failure or interrupt removes it.
    with atomic_dir(final, replace=True) as work:
        print(f"[1/6] sampling real text (CPython stdlib sources, /usr/share/doc) -> {final.name}/sample.jsonl")
        docs, size = write_sample(work / "sample.jsonl", args.sample_bytes)
        print(f"      {docs} documents, {size / 1e6:.1f} MB")

        print("[2/6] tokenizing with the Qwen tokenizer -> Megatron .bin/.idx")
        result = preprocess([work / "sample.jsonl"], work / "data" / "sample", workers=args.nproc,
                            progress=False, log=lambda msg: print("      " + msg))
        prefix = result.datasets[0].prefix
        print(f"      {result.documents} documents, {result.tokens:,} tokens "
              f"({result.tokenizer_backend}, {result.mb_per_s:.1f} MB/s)")

        print(f"[3/6] initial weights: transformers init (seed 1234) -> init_hf/, convert hf-to-mcore --tp {tp} "
              "-> init_mcore/")
        init_hf, init_mcore = initial_weights(work, tp)

        print(f"[4/6] ours: {RECIPE} (TP={tp}) on {args.nproc} CPU processes for {args.steps} steps")
        run_training(work, prefix, args.steps, args.nproc, init_mcore)

        print(f"[5/6] the reference: transformers + torch AdamW, one process, {args.steps} steps, same "
              "weights and batches")
        run_reference(work, prefix, args.steps, init_hf)

        print("[6/6] ours against the reference (bench accept, per-step loss gap, throughput)")
        judgement = judge(work, args.nproc)
        text = write_report(work, final, judgement, time.perf_counter() - started)
    print(text)
    print(f"outputs in {final}/ ({time.perf_counter() - started:.0f} s)")
    return judgement.exit_code


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="end-to-end CPU demo: preprocess real text, train qwen3_tiny TP=2 on 2 processes and an "
             "independent reference from the same weights, judge ours against it",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", default="demo_output", help="output directory (replaced atomically)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"training steps (at least {MIN_STEPS})")
    p.add_argument("--nproc", type=int, default=2, help="CPU processes (the recipe's TP=2 needs 2)")
    p.add_argument("--sample-bytes", type=int, default=SAMPLE_BYTES, help="text to sample")
    p.set_defaults(func=run_demo)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="qwen-pretrain demo")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    ns = parser.parse_args(["demo", *sys.argv[1:]])
    sys.exit(ns.func(ns))
