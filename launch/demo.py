"""`qwen-pretrain demo`: the end-to-end CPU demo, raw text to an acceptance verdict.

1. Sample real text found on any machine with Python: the CPython standard library's sources
   (then /usr/share/doc if more is wanted), a few MB as jsonl, in sorted path order.
2. Tokenize it with the official Qwen tokenizer into Megatron .bin/.idx
   (`qwen_pretrain.preprocessing.pipeline.preprocess`).
3. Train `qwen3_tiny` with TP=2 on two CPU processes (torchrun + gloo, our Megatron-core
   trainer) for 40 steps, validating every 20, checkpointing at the end.
4. Parse the log with the benchmarks parser and judge it with the acceptance rule: mean
   tokens/s/GPU without the first and last 10 steps, final loss within 5% of the baseline.

The baseline is honest about what it is: the final loss this very demo reached when we ran
it (`REFERENCE_FINAL_LOSS`, CPython 3.11 stdlib corpus, seed 1234). Same corpus and seed give
the same loss up to CPU floating-point differences, so the verdict checks that the whole chain
(tokenizer, dataset, model, optimizer, schedule) still behaves as it did; it says nothing about
GPU throughput. Outputs go to a temp directory renamed to `--out` (default demo_output/) at the
end, so an interrupted demo never leaves a complete-looking output.
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
# Measured by `qwen-pretrain demo` on the development machine (2 CPU cores, CPython 3.11.7
# stdlib corpus, seed 1234): reduced_train_loss 10.3489 at global_step 39 (from 11.94 at step 0).
REFERENCE_FINAL_LOSS = 10.35
LOSS_TOLERANCE = 0.05
SAMPLE_BYTES = 3_000_000


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


def run_training(work: Path, data_prefix: str, steps: int, nproc: int) -> Path:
    """torchrun the trainer on CPU; echo its NeMo lines; returns the log path."""
    from qwen_pretrain.launch.train_cmd import local_torchrun_command

    log = work / "train.log"
    argv = ["--recipe", RECIPE, "--data-path", data_prefix, "--train-steps", str(steps),
            "--log-dir", str(work / "train"), "--save", str(work / "checkpoints")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with log.open("w") as out, (work / "train.stderr.log").open("w") as err:
        proc = subprocess.Popen(local_torchrun_command(argv, nproc), stdout=subprocess.PIPE, stderr=err,
                                text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            out.flush()
            print("  " + line.rstrip(), flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = (work / "train.stderr.log").read_text()[-3000:]
        raise UserError(f"demo: training failed (exit {rc}); last stderr:\n{tail}", exit_code=1)
    return log


def judge(log: Path) -> tuple[Any, Any]:
    from qwen_pretrain.benchmarks.acceptance import Baseline, accept
    from qwen_pretrain.benchmarks.runs import parse_run

    run = parse_run(str(log))
    baseline = Baseline(source="demo reference (final loss of this demo, CPython 3.11 stdlib corpus)",
                        final_loss=REFERENCE_FINAL_LOSS, final_step=STEPS - 1, format=run.format)
    return run, accept(run, baseline, loss_tol=LOSS_TOLERANCE)


def run_demo(args: argparse.Namespace) -> int:
    from qwen_pretrain.benchmarks.acceptance import verdict_table
    from qwen_pretrain.preprocessing.pipeline import preprocess

    final = Path(args.out).resolve()
    started = time.perf_counter()
    # The whole demo works in a temporary directory beside `final` that replaces an older demo
    # output only once the report is written; a failure or interrupt removes it.
    with atomic_dir(final, replace=True) as work:
        print(f"[1/4] sampling real text (CPython stdlib sources, /usr/share/doc) -> {work.name}/sample.jsonl")
        docs, size = write_sample(work / "sample.jsonl", args.sample_bytes)
        print(f"      {docs} documents, {size / 1e6:.1f} MB")

        print("[2/4] tokenizing with the Qwen tokenizer -> Megatron .bin/.idx")
        result = preprocess([work / "sample.jsonl"], work / "data" / "sample", workers=args.nproc,
                            progress=False, log=lambda msg: print("      " + msg))
        prefix = result.datasets[0].prefix
        print(f"      {result.documents} documents, {result.tokens:,} tokens "
              f"({result.tokenizer_backend}, {result.mb_per_s:.1f} MB/s)")

        print(f"[3/4] training {RECIPE} (TP=2) on {args.nproc} CPU processes for {args.steps} steps")
        log = run_training(work, prefix, args.steps, args.nproc)

        print("[4/4] acceptance report (benchmarks parser, seed rule)")
        run, verdict = judge(log)
        window = (f"steps {run.window_first_step}..{run.window_last_step}"
                  if run.window_first_step is not None else "no window")
        report = [
            f"log: {final / 'train.log'} ({run.format} format, {run.steps} steps)",
            f"mean tokens/s/GPU ({window}): "
            + (f"{run.tokens_per_sec_per_gpu_mean:,.1f}" if run.tokens_per_sec_per_gpu_mean else "-")
            + " (CPU, two processes sharing this machine)",
            f"final loss (step {run.final_step}): {run.final_loss}",
            f"baseline: final loss {REFERENCE_FINAL_LOSS} recorded by this demo (same corpus and "
            f"seed); tolerance +-{LOSS_TOLERANCE:.0%}",
            verdict_table(verdict),
        ]
        text = "\n".join(report)
        (work / "report.txt").write_text(text + "\n")
        (work / "report.json").write_text(json.dumps(
            {"run": run.to_json(), "verdict": verdict.status, "reason": verdict.reason,
             "baseline_final_loss": REFERENCE_FINAL_LOSS, "seconds": time.perf_counter() - started},
            indent=1) + "\n")
    print(text)
    print(f"outputs in {final}/ ({time.perf_counter() - started:.0f} s)")
    return verdict.exit_code


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="end-to-end CPU demo: preprocess real text, train qwen3_tiny TP=2 on 2 processes, "
             "parse the log, print the acceptance report",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", default="demo_output", help="output directory (replaced atomically)")
    p.add_argument("--steps", type=int, default=STEPS, help="training steps (>= 21 for the rule)")
    p.add_argument("--nproc", type=int, default=2, help="CPU processes (the recipe's TP=2 needs 2)")
    p.add_argument("--sample-bytes", type=int, default=SAMPLE_BYTES, help="text to sample")
    p.set_defaults(func=run_demo)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="qwen-pretrain demo")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    ns = parser.parse_args(["demo", *sys.argv[1:]])
    sys.exit(ns.func(ns))
