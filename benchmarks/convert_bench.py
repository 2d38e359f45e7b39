"""Benchmark: HF -> megatron-core conversion of a random-weight model with a real shape.

    .venv/bin/python -m qwen_pretrain.benchmarks.convert_bench --recipe qwen3_1p7b --pp 4

1. Generates the recipe's model with random bf16 weights, tensor by tensor, as sharded
   safetensors under a temporary directory (deleted at the end).
2. Baseline, in a child process: reads every byte of those files into a reused buffer (the
   raw read speed of the same files).
3. Raw copy, in a child process: each tensor (safe_open) written to one output file beside
   them (what any converter must at least do: read and write every byte; no conversion).
4. Kernel copy, in a child process: each file copied whole with `os.copy_file_range` (no byte
   passes through the process: the least any converter that writes its output must spend).
5. Ours, in a child process: `qwen-pretrain convert hf-to-mcore` with the given layout.
All read the files right after they were written, so all read from the page cache: the ratio
compares like with like, the absolute speeds are page-cache speeds, not disk speeds. Writes go
to --workdir: on a disk they are bounded by its write speed (raw copy shows that bound);
`--workdir /dev/shm` measures the conversion without the disk.
Each child runs under `benchmarks/harness.run_child`, which gives its peak RSS; times are wall
times of the work after start-up (Python and the imports of torch and the converter), for all
alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qwen_pretrain.benchmarks.harness import ChildRun, compare, load_average, run_child

# Every byte of the files, read into one reused buffer. (safe_open's get_tensor is no baseline:
# with torch imported it returns tensors that map the file and reads nothing.)
RAW_READ = """
import sys, time
from pathlib import Path
t = time.perf_counter(); n = 0
view = memoryview(bytearray(64 << 20))
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with open(f, "rb", buffering=0) as h:
        while k := h.readinto(view):
            n += k
print(time.perf_counter() - t)
"""

# The conversion as the CLI runs it, timed after start-up (imports) like the baselines.
CONVERT = """
import sys, time
import qwen_pretrain.conversion.convert, torch
from qwen_pretrain.launch.cli import main
t = time.perf_counter()
code = main(sys.argv[1:])
print(time.perf_counter() - t)
sys.exit(code)
"""

RAW_COPY = """
import os, sys, time
from pathlib import Path
import torch
from safetensors import safe_open
t = time.perf_counter()
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(str(f), "pt") as h:
        for k in h.keys():
            os.write(fd, h.get_tensor(k).reshape(-1).view(torch.uint8).numpy())
os.close(fd)
print(time.perf_counter() - t)
"""

KERNEL_COPY = """
import os, sys, time
from pathlib import Path
t = time.perf_counter()
out = Path(sys.argv[2]); out.mkdir()
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    src, dst = os.open(f, os.O_RDONLY), os.open(out / f.name, os.O_WRONLY | os.O_CREAT)
    size, done = os.fstat(src).st_size, 0
    while done < size:
        done += os.copy_file_range(src, dst, size - done, done, done)
    os.close(src); os.close(dst)
print(time.perf_counter() - t)
"""


@dataclass(frozen=True)
class Measured:
    """One measured child: the run, and the seconds of its work after start-up (it prints them last)."""

    run: ChildRun
    seconds: float


def generate(out: Path, recipe: str, shard_bytes: int = 512 * 1024**2) -> int:
    """Random bf16 weights of the recipe's shape, written shard by shard; returns total bytes."""
    import torch
    from qwen_pretrain.conversion import hf_io
    from qwen_pretrain.conversion.mapping import expected_hf_shapes
    from qwen_pretrain.recipes import get_recipe
    from safetensors.torch import save_file

    shape = get_recipe(recipe).model
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    weight_map: dict[str, str] = {}
    files = 0

    def flush() -> None:
        nonlocal shard, size, files
        name = f"model-{files:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size, files = {}, 0, files + 1

    for name, dims in expected_hf_shapes(shape).items():
        t = torch.empty(dims, dtype=torch.bfloat16).normal_(generator=gen)
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps(hf_io.hf_config_for(shape)))
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="qwen3_1p7b")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--format", default="legacy", choices=("legacy", "torch_dist"))
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    a = p.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="convert_bench_", dir=a.workdir))
    try:
        py = sys.executable
        # in a child, so the memory of the generated tensors is gone before the measured runs
        gen_cmd = [py, "-c", "from qwen_pretrain.benchmarks.convert_bench import generate; "
                   f"from pathlib import Path; print(generate(Path({str(root / 'hf')!r}), {a.recipe!r}))"]
        gen = run_child(gen_cmd)
        if not gen.ok:
            raise subprocess.CalledProcessError(gen.exit_code, gen_cmd, gen.stdout, gen.stderr)
        size = int(gen.last_stdout_line())
        gen_s = gen.wall_s
        raw_script = root / "raw_read.py"
        raw_script.write_text(RAW_READ)
        copy_script = root / "raw_copy.py"
        copy_script.write_text(RAW_COPY)
        kernel_script = root / "kernel_copy.py"
        kernel_script.write_text(KERNEL_COPY)
        convert_script = root / "convert.py"
        convert_script.write_text(CONVERT)

        def measured(args: list[str]) -> Measured:
            os.sync()  # each child starts with no dirty pages left by the one before
            run = run_child([py, *args])
            if not run.ok:
                sys.stderr.write(run.stderr[-3000:])
                raise SystemExit(f"child failed: {args}")
            return Measured(run, float(run.last_stdout_line()))

        def raw_copy() -> Measured:
            m = measured([str(copy_script), str(root / "hf"), str(root / "copy.bin")])
            (root / "copy.bin").unlink()
            return m

        def kernel_copy() -> Measured:
            m = measured([str(kernel_script), str(root / "hf"), str(root / "kernel_copy")])
            shutil.rmtree(root / "kernel_copy")
            return m

        def convert() -> Measured:
            shutil.rmtree(root / "mcore", ignore_errors=True)  # a repeat writes afresh
            return measured([
                str(convert_script), "convert", "hf-to-mcore", "--hf", str(root / "hf"),
                "--out", str(root / "mcore"), "--tp", str(a.tp), "--pp", str(a.pp), "--format", a.format,
                "--quiet",
            ])  # fmt: skip

        runs = compare(
            {"raw_read": lambda: measured([str(raw_script), str(root / "hf")]),
             "raw_copy": raw_copy, "kernel_copy": kernel_copy, "convert": convert},
            speed=lambda m: 1 / m.seconds,
        )  # fmt: skip
        raw, copy, kernel, conv = (runs.best[k] for k in ("raw_read", "raw_copy", "kernel_copy", "convert"))
        raw_read_s, copy_s, kernel_s, conv_wall = raw.seconds, copy.seconds, kernel.seconds, conv.seconds
        raw_rss, conv_rss = raw.run.peak_rss_bytes / 1024**3, conv.run.peak_rss_bytes / 1024**3
        out_bytes = sum(f.stat().st_size for f in (root / "mcore").rglob("*") if f.is_file())
        gb = size / 1024**3
        result = {
            "recipe": a.recipe,
            "layout": f"tp={a.tp} pp={a.pp} format={a.format}",
            "checkpoint_gb": round(gb, 3),
            "written_gb": round(out_bytes / 1024**3, 3),
            "generate_s": round(gen_s, 1),
            "raw_read_s": round(raw_read_s, 2),
            "raw_read_gb_per_s": round(gb / raw_read_s, 3),
            "raw_read_peak_rss_gb": round(raw_rss, 3),
            "raw_copy_s": round(copy_s, 2),
            "raw_copy_gb_per_s": round(gb / copy_s, 3),
            "kernel_copy_s": round(kernel_s, 2),
            "kernel_copy_gb_per_s": round(gb / kernel_s, 3),
            "convert_s": round(conv_wall, 2),
            "convert_s_with_startup": round(conv.run.wall_s, 2),
            "convert_gb_per_s": round(gb / conv_wall, 3),
            "convert_peak_rss_gb": round(conv_rss, 3),
            "rss_fraction_of_checkpoint": round(conv_rss / gb, 3),
            "rss_target_gb": round(0.25 * gb + 1, 3),
            "throughput_fraction_of_raw_read": round(runs.ratio("convert", "raw_read"), 3),
            "throughput_fraction_of_raw_copy": round(runs.ratio("convert", "raw_copy"), 3),
            "throughput_fraction_of_kernel_copy": round(runs.ratio("convert", "kernel_copy"), 3),
            "load": load_average(),
        }
        result["rss_ok"] = conv_rss <= result["rss_target_gb"]
        result["throughput_ok"] = result["throughput_fraction_of_raw_read"] >= 0.5
        print(json.dumps(result, indent=2))
        return 0 if result["rss_ok"] and result["throughput_ok"] else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
