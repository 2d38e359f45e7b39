"""Speed and memory of the log parser against the naive script a user would otherwise write.

    .venv/bin/python -m qwen_pretrain.benchmarks.parse_bench                 # 100 MB and 1 GB logs
    .venv/bin/python -m qwen_pretrain.benchmarks.parse_bench --sizes-mb 5    # a quick look

Two kinds of generated NeMo 2 logs, each at every size, in a temporary directory deleted after:
  dense  every line a new training step (the worst case for a parser: all work, no skipping)
  noisy  a 1000-step acceptance run buried in what big logs are made of: NCCL INFO lines,
         rank-prefixed warnings, `\\r` progress bars
Each measurement runs in a fresh process (peak RSS is that process's own). Ours is
`parse_run` (the whole acceptance rule); the baseline reads the file and runs `re.findall`
for the two numbers, as one would in a notebook. Both run in the same invocation, one after the
other, and the ratio is printed. MB/s is reported on wall time and on the process's CPU time
(what one core does when the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qwen_pretrain.benchmarks.harness import compare, load_text, run_child


def generate(path: Path, kind: str, size_bytes: int) -> int:
    """Write a NeMo 2 log of about `size_bytes`; returns its number of unique steps."""
    # imported here: the measuring children import this module, and the generator's imports
    # (numpy) would count in the naive baseline's peak RSS
    from qwen_pretrain.benchmarks.synthetic import BIG_LOG_NOISE, run_steps, write_sized_run

    if kind == "dense":
        # at most one step per byte: the writer stops once the log has its size
        steps = run_steps(size_bytes, first=0, total=size_bytes // 300 + 1)
        return write_sized_run(path, "nemo", steps, size_bytes)
    # noisy: a 1000-step run (NeMo counts from 0) spread evenly through the noise
    return write_sized_run(path, "nemo", run_steps(1000, first=0, total=1000), size_bytes, noise=BIG_LOG_NOISE)


def measure_ours(path: str) -> dict:
    from qwen_pretrain.benchmarks.runs import parse_run

    wall, cpu = time.perf_counter(), time.process_time()
    run = parse_run(path)
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
            "steps": run.steps, "tps_mean": run.tokens_per_sec_per_gpu_mean, "final_loss": run.final_loss}


def measure_naive(path: str) -> dict:
    """What a user writes without a parser: read it all, findall, slice."""
    import re

    wall, cpu = time.perf_counter(), time.process_time()
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    tps = [float(x) for x in re.findall(r"tokens_per_sec_per_gpu: ([0-9.e+-]+)", text)]
    loss = [float(x) for x in re.findall(r"reduced_train_loss: ([0-9.e+-]+)", text)]
    window = tps[10:-10]
    mean = sum(window) / len(window) if window else None
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
            "steps": len(tps), "tps_mean": mean, "final_loss": loss[-1] if loss else None}


def _measure_in_child(which: str, path: Path) -> dict:
    """One measurement in a fresh process; the peak RSS is that process's (its whole tree's)."""
    command = [sys.executable, "-m", "qwen_pretrain.benchmarks.parse_bench", "--measure", which, str(path)]
    run = run_child(command)
    if not run.ok:
        raise subprocess.CalledProcessError(run.exit_code, command, run.stdout, run.stderr)
    return {**json.loads(run.stdout), "peak_rss_mb": run.peak_rss_bytes / 1024**2}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="100,1000", help="log sizes in MB (default 100,1000)")
    ap.add_argument("--kinds", default="dense,noisy", help="dense, noisy or both (default)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the naive baseline")
    ap.add_argument("--measure", nargs=2, metavar=("WHICH", "LOG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.measure:  # child process: one measurement; the parent samples its peak RSS
        which, path = args.measure
        print(json.dumps((measure_ours if which == "ours" else measure_naive)(path)))
        return 0

    sizes = [float(s) for s in args.sizes_mb.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    print(f"parse_bench: python {sys.version.split()[0]}, {os.cpu_count()} cores, load average {load_text()}", flush=True)
    header = (f"{'log':<14}{'MB':>7}{'steps':>10} | {'ours MB/s wall':>14}{'cpu':>7}{'RSS MB':>8} | "
              f"{'naive MB/s wall':>15}{'cpu':>7}{'RSS MB':>8} | {'speed ours/naive':>16}{'same mean':>10}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="parse_bench.") as tmp:
        for kind in kinds:
            for size in sizes:
                path = Path(tmp) / f"{kind}_{size:g}MB.log"
                t0 = time.perf_counter()
                generate(path, kind, int(size * 1e6))
                mb = path.stat().st_size / 1e6
                print(f"generated {path.name}: {mb:.0f} MB in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
                measurements = {"ours": lambda path=path: _measure_in_child("ours", path)}
                if not args.no_baseline:
                    measurements["naive"] = lambda path=path: _measure_in_child("naive", path)
                runs = compare(measurements, speed=lambda r: 1 / r["wall_s"])
                path.unlink()
                ours, naive = runs.best["ours"], runs.best.get("naive")
                rows.append((kind, mb, ours, naive))
                speed = "-" if naive is None else f"{runs.ratio('ours', 'naive'):.2f}x"
                same = "-" if naive is None else (
                    "yes" if ours["tps_mean"] and abs(ours["tps_mean"] - naive["tps_mean"]) < 1e-6 * ours["tps_mean"] else "NO")
                line = (f"{kind:<14}{mb:>7.0f}{ours['steps']:>10} | {mb / ours['wall_s']:>14.1f}"
                        f"{mb / ours['cpu_s']:>7.1f}{ours['peak_rss_mb']:>8.0f} | ")
                if naive is None:
                    line += f"{'-':>15}{'-':>7}{'-':>8} | {'-':>16}{'-':>10}"
                else:
                    line += (f"{mb / naive['wall_s']:>15.1f}{mb / naive['cpu_s']:>7.1f}{naive['peak_rss_mb']:>8.0f} | "
                             f"{speed:>16}{same:>10}")
                if len(rows) == 1:
                    print(header)
                print(line, flush=True)
    print(f"done, load average {load_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
