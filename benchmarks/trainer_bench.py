"""Benchmark: tokens/s of our trainer against the reference trainer on CPU, side by side.

    .venv/bin/python -m qwen_pretrain.benchmarks.trainer_bench            # qwen3_tiny, 30 steps
    .venv/bin/python -m qwen_pretrain.benchmarks.trainer_bench --repeats 2 --json

The same model (the recipe's shape), batch (its global batch, sequence length and micro-batch),
data (megatron-core mock data) and machine, one child process after another, round by round
(`harness.compare`, best of `--repeats` each):

- ours_tp1:  our Megatron-core trainer at TP=1 in one process, every core as a torch thread;
- reference: `train-reference` (transformers + torch AdamW) in one process, every core as a thread,
             the vocabulary padded as TP=1 pads it (the same model as ours_tp1);
- ours_tp2:  our trainer at TP=2, two processes of one thread each (the demo's layout).

The figure is the whole machine's tokens/s: the mean tokens/s/GPU of the acceptance window
(without the first and last 10 steps) times the processes. Validation is off; start-up (imports,
model build, dataset indices) is outside the window. Every child gets `OMP_WAIT_POLICY=PASSIVE`:
on shared cores a spinning OpenMP worker burns the time its sibling waits for, which would
penalise the threaded runs for other people's load. The load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qwen_pretrain.benchmarks.harness import ChildRun, compare, load_text, run_child
from qwen_pretrain.benchmarks.runs import RunResult, parse_run


@dataclass(frozen=True)
class Measured:
    run: ChildRun
    result: RunResult
    processes: int

    @property
    def tokens_per_s(self) -> float:
        """Whole machine: tokens/s/GPU over the acceptance window x processes (0 when unusable)."""
        return (self.result.tokens_per_sec_per_gpu_mean or 0.0) * self.processes


def ours_command(recipe: str, steps: int, tp: int) -> list[str]:
    """torchrun our trainer on this machine: `tp` processes on mock data, no validation."""
    from qwen_pretrain.training.parallel import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), "-m", "qwen_pretrain.training.cli",
            "--recipe", recipe, "--tp", str(tp), "--mock-data", "--train-steps", str(steps), "--eval-interval", "0"]


def reference_command(recipe: str, steps: int, init: Path) -> list[str]:
    return [sys.executable, "-m", "qwen_pretrain.benchmarks.reference_trainer", "--recipe", recipe,
            "--init", str(init), "--mock-data", "--train-steps", str(steps), "--eval-interval", "0",
            "--pad-vocab-as-tp", "1"]


def measure(command: list[str], threads: int, processes: int, log: Path) -> Measured:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    run = run_child(command, env=env)
    if not run.ok:
        sys.stderr.write(run.stderr[-3000:])
        raise SystemExit(f"trainer_bench: child failed (exit {run.exit_code}): {' '.join(command[:8])} ...")
    log.write_text(run.stdout)
    result = parse_run(log)
    if not result.usable:
        raise SystemExit(f"trainer_bench: {log.name}: {result.reason}")
    return Measured(run, result, processes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="qwen3_tiny", help="a tiny recipe (default qwen3_tiny)")
    p.add_argument("--steps", type=int, default=30, help="training steps per run (>= 21; default 30)")
    p.add_argument("--repeats", type=int, default=1, help="rounds; the best run of each counts")
    p.add_argument("--json", action="store_true", help="print the result as JSON only")
    a = p.parse_args(argv)
    if a.steps < 21:
        p.error("--steps: at least 21 (the acceptance window drops 10 steps at each end)")
    from qwen_pretrain.benchmarks.reference_trainer import write_initial_weights
    from qwen_pretrain.recipes import get_recipe

    recipe = get_recipe(a.recipe)
    cores = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="trainer_bench_"))
    try:
        init = write_initial_weights(recipe.model, root / "init_hf", recipe.training.seed)
        rounds = {"n": 0}

        def note(name: str, m: Measured) -> None:
            if not a.json:
                print(f"  {name:9s} {m.tokens_per_s:9,.0f} tokens/s  (step {m.result.step_time_mean_s:.3f} s, "
                      f"load {load_text()})", flush=True)

        def run(name: str, command: list[str], threads: int, processes: int) -> Measured:
            rounds["n"] += 1
            return measure(command, threads, processes, root / f"{name}-{rounds['n']}.log")

        best = compare(
            {
                "ours_tp1": lambda: run("ours_tp1", ours_command(a.recipe, a.steps, 1), cores, 1),
                "reference": lambda: run("reference", reference_command(a.recipe, a.steps, init), cores, 1),
                "ours_tp2": lambda: run("ours_tp2", ours_command(a.recipe, a.steps, 2), 1, 2),
            },
            speed=lambda m: m.tokens_per_s, repeats=a.repeats, on_result=note,
        )  # fmt: skip
        t = recipe.training
        result = {
            "recipe": a.recipe,
            "batch": f"{t.global_batch_size} x {t.seq_length} tokens, micro-batch {recipe.parallel.micro_batch_size}",
            "steps": a.steps,
            "window": f"steps {best.best['ours_tp1'].result.window_first_step}.."
                      f"{best.best['ours_tp1'].result.window_last_step}",
            "cores": cores,
            "repeats": a.repeats,
            "tokens_per_s": {k: round(m.tokens_per_s, 1) for k, m in best.best.items()},
            "ours_tp1_over_reference": round(best.ratio("ours_tp1", "reference"), 3),
            "ours_tp2_over_reference": round(best.ratio("ours_tp2", "reference"), 3),
            "ours_tp2_over_ours_tp1": round(best.ratio("ours_tp2", "ours_tp1"), 3),
            "load_after": load_text(),
        }
        if a.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{a.recipe}, {result['batch']}, {a.steps} steps, {result['window']}, {cores} cores, "
                  f"best of {a.repeats}:")
            for key in ("ours_tp1_over_reference", "ours_tp2_over_reference", "ours_tp2_over_ours_tp1"):
                print(f"  {key.replace('_over_', ' / '):24s} {result[key]:.2f}x")
            print(f"  load average after: {result['load_after']}")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
