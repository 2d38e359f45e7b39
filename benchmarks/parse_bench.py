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
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NOISE_LINES = [
    "node-17:12345:12380 [3] NCCL INFO Channel 07/0 : 3[3] -> 4[4] via P2P/CUMEM/read",
    "node-17:12345:12380 [3] NCCL INFO Connected all rings, use ring PXN 0 GDR 1",
    "[rank5]:[W1017 11:33:02.123456 ProcessGroupNCCL.cpp:4561] [PG ID 0 PG GUID 0 Rank 5] using GPU 5 as device",
    "[NeMo W 2025-10-17 11:33:02 nemo_logging:405] /usr/local/lib/python3.12/dist-packages/lightning/pytorch/"
    "trainer/connectors/logger_connector/result.py:431: It is recommended to use `self.log(..., sync_dist=True)`",
    "\rEpoch 0:  53%|\u2588\u2588\u2588\u2588\u2588\u258e    | 528/999 [21:29<19:10, v_num=0, "
    "reduced_train_loss=3.060, global_step=528.0, consumed_samples=16928.0]",
    "[default3]:[NeMo I 2025-10-17 11:33:02 utils:661] Setting up optimizer with config OptimizerConfig(lr=0.0003)",
]


def _step_line(step: int, total: int, rng: random.Random) -> str:
    t = 2.443 * (1 + 0.01 * rng.uniform(-1, 1))
    return (
        f"[2025-10-17T11:33:02+08:00] Training epoch 0, iteration {step}/{total - 1} | lr: 0.0001754 | "
        f"global_batch_size: 32 | global_step: {step} | reduced_train_loss: {3 + 8 / (1 + step / 500):.4} | "
        f"train_step_timing in s: {t:.4} | tokens_per_sec_per_gpu: {32 * 4096 / t / 8:.4} | "
        f"consumed_samples: {(step + 1) * 32} | val_loss: 3.624\n"
    )


def generate(path: Path, kind: str, size_bytes: int) -> int:
    """Write a log of about `size_bytes`; returns its number of unique steps."""
    rng = random.Random(0)
    chunk: list[str] = []
    written = 0
    steps = 0
    with open(path, "w", encoding="utf-8") as f:
        if kind == "dense":
            total = size_bytes // 300 + 1
            while written < size_bytes:
                line = _step_line(steps, total, rng)
                chunk.append(line)
                written += len(line)
                steps += 1
                if len(chunk) >= 20000:
                    f.write("".join(chunk))
                    chunk.clear()
        else:  # noisy: 1000 steps spread evenly through the noise
            noise = "".join(rng.choice(NOISE_LINES) + "\n" for _ in range(4000))
            noise_bytes = len(noise.encode())
            per_step = max(size_bytes // 1000, 1)
            while steps < 1000:
                line = _step_line(steps, 1000, rng)
                chunk.append(line)
                written += len(line)
                steps += 1
                target = per_step * steps
                while written < target:
                    take = min(noise_bytes, target - written)
                    piece = noise[:take] if take < noise_bytes else noise
                    chunk.append(piece)
                    written += len(piece.encode())
                f.write("".join(chunk))
                chunk.clear()
        f.write("".join(chunk))
    return steps


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
    proc = subprocess.run([sys.executable, "-m", "qwen_pretrain.benchmarks.parse_bench", "--measure", which, str(path)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="100,1000", help="log sizes in MB (default 100,1000)")
    ap.add_argument("--kinds", default="dense,noisy", help="dense, noisy or both (default)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the naive baseline")
    ap.add_argument("--measure", nargs=2, metavar=("WHICH", "LOG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.measure:  # child process: one measurement, its own peak RSS
        which, path = args.measure
        result = (measure_ours if which == "ours" else measure_naive)(path)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return 0

    sizes = [float(s) for s in args.sizes_mb.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    print(f"parse_bench: python {sys.version.split()[0]}, {os.cpu_count()} cores, {_load()}", flush=True)
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
                ours = _measure_in_child("ours", path)
                naive = None if args.no_baseline else _measure_in_child("naive", path)
                path.unlink()
                rows.append((kind, mb, ours, naive))
                speed = "-" if naive is None else f"{naive['wall_s'] / ours['wall_s']:.2f}x"
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
    print(f"done, {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
