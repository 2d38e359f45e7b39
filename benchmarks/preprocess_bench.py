"""Preprocessing throughput and memory: ours against the bare tokenizers and Megatron-LM, in one run.

    .venv/bin/python -m qwen_pretrain.benchmarks.preprocess_bench --make-corpus-mb 80 --workers 2 \\
        [--megatron-lm DIR [--megatron-pythonpath EXTRA]] [--only ours gigatoken] [--repeats 2] [--json OUT]

Every mode runs on two corpora, the whole one and its first tenth (`--small-fraction`), each run
in a fresh process, best of `--repeats` runs each. The figure is the marginal throughput,
(big MB - small MB) / (big s - small s): start-up (interpreter, imports, loading the tokenizer)
falls out, what is left is the cost per byte. Modes:
- `ours`: `qwen-pretrain preprocess` as a user runs it (wall time of the whole command);
- `gigatoken`: the bare tokenizer's `encode_batch` in a fresh process (cold cache, as a run
  starts) on texts already in memory, 64 MB per call on its thread pool of `--workers` threads;
  encode time only: the ceiling for any pipeline built around it;
- `hf_tokenizers`: Hugging Face `tokenizers` `encode_batch` the same way, the plain baseline;
- `megatron_lm`: Megatron-LM's `tools/preprocess_data.py` (HuggingFaceTokenizer, --append-eod)
  when `--megatron-lm` points at a checkout; `--megatron-pythonpath` adds folders it needs.
Besides wall-clock MB/s it reports MB per CPU-second (user + system of the whole process tree),
which stays comparable when other jobs share the cores; the load average is printed with every
run. Peak RSS is that of the whole process tree (see `benchmarks/harness.py`). Start-up: the wall
time of `qwen-pretrain preprocess --help` and of a run on a 5-document corpus.
`--make-corpus-mb N` builds the corpus under /tmp from real text on this machine (CPython's
standard library and /usr/share/doc), documents of random paragraphs, and deletes it after.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from qwen_pretrain.benchmarks.harness import compare, load_text, run_child
from qwen_pretrain.recipes.files import atomic_write_text

MODES = ("ours", "gigatoken", "hf_tokenizers", "megatron_lm")
BASELINES = ("gigatoken", "hf_tokenizers", "megatron_lm")
ENCODE_BATCH_BYTES = 64 << 20


def real_paragraphs(limit_bytes: int = 48 << 20) -> list[str]:
    """Paragraphs of real text: Python sources and /usr/share/doc (plain and .gz)."""
    paragraphs: list[str] = []
    size = 0
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(stdlib.rglob("*.py")) + sorted(Path("/usr/share/doc").rglob("*"))
    for path in sources:
        if size >= limit_bytes or not path.is_file():
            continue
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        for para in text.split("\n\n"):
            if para.strip():
                paragraphs.append(para)
                size += len(para)
    return paragraphs


def make_corpus(path: Path, megabytes: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    paragraphs = real_paragraphs()
    target = megabytes * 1_000_000
    written = 0
    with open(path, "w") as f:
        while written < target:
            doc = "\n\n".join(rng.choice(paragraphs) for _ in range(rng.randint(3, 60)))
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
    return path


def head_corpus(corpus: Path, out: Path, fraction: float) -> Path:
    """The first `fraction` of `corpus`, cut at a line end: the same kind of text, less of it."""
    limit = corpus.stat().st_size * fraction
    with open(corpus, "rb") as src, open(out, "wb") as dst:
        for line in src:
            dst.write(line)
            if dst.tell() >= limit:
                break
    return out


def run_command(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    run = run_child(cmd, env=env, cwd=cwd, merge_stderr=True)
    if not run.ok:
        raise SystemExit(f"{cmd[0]} failed ({run.exit_code}):\n{run.stdout[-3000:]}")
    # CPU seconds of the whole tree (workers are waited for by their parent, so they count)
    return {"seconds": run.wall_s, "cpu_seconds": run.cpu_s, "peak_rss_gb": run.peak_rss_bytes / 1e9,
            "output": run.stdout}


def our_command() -> str:
    return str(Path(sys.executable).parent / "qwen-pretrain")


def bench_ours(corpus: Path, prefix: Path, workers: int) -> dict:
    result = run_command([our_command(), "preprocess", "--input", str(corpus), "--output-prefix", str(prefix),
                          "--workers", str(workers), "--no-progress"])
    lines = result["output"].splitlines()
    tokens = next(int(line.split()[3].replace(",", "")) for line in lines if line.startswith("written"))
    backend = next(line.split()[1] for line in lines if line.startswith("tokenizer"))
    return {**result, "tokens": tokens, "backend": backend}


def bench_encoder(corpus: Path, which: str, workers: int) -> dict:
    """A fresh process times `which`'s encode_batch alone (see `encode_only`)."""
    env = dict(os.environ)
    env.setdefault("RAYON_NUM_THREADS", str(workers))  # both libraries' thread pools: --workers cores
    cmd = [sys.executable, "-m", "qwen_pretrain.benchmarks.preprocess_bench", "--encode-only", which,
           "--corpus", str(corpus), "--workers", str(workers)]
    run = run_child(cmd, env=env, merge_stderr=True)
    if not run.ok:
        raise SystemExit(f"encode-only {which} failed ({run.exit_code}):\n{run.stdout[-3000:]}")
    return {**json.loads(run.last_stdout_line()), "peak_rss_gb": run.peak_rss_bytes / 1e9}


def _texts_in_batches(corpus: Path, batch_bytes: int = ENCODE_BATCH_BYTES) -> Iterator[list[str]]:
    batch, size = [], 0
    with open(corpus, "rb") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            size += len(line)
            if size >= batch_bytes:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def encode_only(corpus: Path, which: str, workers: int) -> dict:
    """Encode time only: texts read and parsed beforehand, batch by batch, untimed."""
    from qwen_pretrain.preprocessing.tokenizer import qwen_tokenizer_dir

    path = qwen_tokenizer_dir() / "tokenizer.json"
    if which == "gigatoken":
        import gigatoken

        tok = gigatoken.Tokenizer(path)
        encode = lambda texts: len(tok.encode_batch(texts, parallel=workers > 1).layout.content)  # noqa: E731
    else:
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(str(path))
        encode = lambda texts: sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))  # noqa: E731
    seconds = cpu = 0.0
    tokens = 0
    for texts in _texts_in_batches(corpus):
        started, cpu_started = time.perf_counter(), _cpu_seconds()
        tokens += encode(texts) + len(texts)  # + one EOD per document, as the pipeline writes
        seconds += time.perf_counter() - started
        cpu += _cpu_seconds() - cpu_started
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens}


def bench_megatron(corpus: Path, prefix: Path, workers: int, checkout: Path, extra: str | None) -> dict:
    from qwen_pretrain.preprocessing.tokenizer import qwen_tokenizer_dir

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(checkout)] + ([extra] if extra else []) + [env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(checkout / "tools" / "preprocess_data.py"), "--input", str(corpus),
           "--output-prefix", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer",
           "--tokenizer-model", str(qwen_tokenizer_dir()), "--workers", str(workers), "--append-eod"]
    # run outside the repository, so nothing of Megatron-LM's lands here
    return run_command(cmd, env=env, cwd=str(prefix.parent))


def bench_startup(work: Path, tiny_from: Path) -> dict:
    """Wall time of `preprocess --help` and of a whole run on a 5-document corpus."""
    tiny = work / "tiny.jsonl"
    with open(tiny_from, "rb") as src:
        tiny.write_bytes(b"".join(src.readline() for _ in range(5)))
    help_run = run_command([our_command(), "preprocess", "--help"])
    tiny_run = run_command([our_command(), "preprocess", "--input", str(tiny), "--output-prefix",
                            str(work / "tiny"), "--no-progress"])
    return {"help_s": help_run["seconds"], "tiny_run_s": tiny_run["seconds"], "seconds": tiny_run["seconds"]}


def compare_ids(ours_prefix: str, megatron_prefix: str) -> str:
    """Megatron-LM's ids against ours: same ids apart from the end-of-document token?"""
    import numpy as np
    from qwen_pretrain.preprocessing.indexed import read_indexed_dataset

    a, b = read_indexed_dataset(ours_prefix), read_indexed_dataset(megatron_prefix)
    if a.documents != b.documents or not np.array_equal(a.lengths, b.lengths):
        return f"documents/lengths differ ({a.documents} vs {b.documents})"
    ends = np.cumsum(a.lengths.astype(np.int64)) - 1
    same_body = np.array_equal(np.delete(np.asarray(a.tokens), ends), np.delete(np.asarray(b.tokens), ends))
    eods = sorted(set(np.asarray(b.tokens)[ends].tolist()))
    return f"ids identical apart from EOD: {same_body}; Megatron-LM's EOD id(s): {eods}"


def marginal(small: dict, big: dict, small_mb: float, big_mb: float) -> dict:
    """MB/s and MB per CPU-second of the bytes the big run has beyond the small one."""
    extra_mb = big_mb - small_mb
    wall = big["seconds"] - small["seconds"]
    cpu = big["cpu_seconds"] - small["cpu_seconds"]
    return {"mb_per_s": extra_mb / wall if wall > 0 else float("nan"),
            "mb_per_cpu_s": extra_mb / cpu if cpu > 0 else float("nan"),
            "small_s": small["seconds"], "big_s": big["seconds"],
            "small_cpu_s": small["cpu_seconds"], "big_cpu_s": big["cpu_seconds"],
            "peak_rss_gb": big.get("peak_rss_gb"), "load": [small["load_after"], big["load_after"]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", type=Path, help="an existing jsonl with field 'text'")
    src.add_argument("--make-corpus-mb", type=int, help="build a corpus of this many MB under /tmp (deleted after)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--small-fraction", type=float, default=0.1,
                   help="the small corpus is this head of the big one (default 0.1: an 80 MB run minus an 8 MB run)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each mode and size; the fastest counts")
    p.add_argument("--megatron-lm", type=Path, help="a Megatron-LM checkout (tools/preprocess_data.py)")
    p.add_argument("--megatron-pythonpath", help="extra PYTHONPATH for Megatron-LM (e.g. a folder with six)")
    p.add_argument("--only", nargs="+", choices=MODES, help="run only these")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--encode-only", choices=("gigatoken", "hf_tokenizers"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.encode_only:  # the child of bench_encoder: one fresh process per measurement
        print(json.dumps(encode_only(args.corpus, args.encode_only, args.workers)))
        return 0
    if args.only and "megatron_lm" in args.only and not args.megatron_lm:
        raise SystemExit("--only megatron_lm needs --megatron-lm DIR")

    work = Path(tempfile.mkdtemp(prefix="preprocess_bench_", dir="/tmp"))
    try:
        big = args.corpus or make_corpus(work / "corpus.jsonl", args.make_corpus_mb)
        small = head_corpus(big, work / "corpus_head.jsonl", args.small_fraction)
        sizes = {"small": small.stat().st_size / 1e6, "big": big.stat().st_size / 1e6}
        corpora = {"small": small, "big": big}
        modes = args.only or [m for m in MODES if m != "megatron_lm" or args.megatron_lm]
        report: dict = {"corpus": str(big), "corpus_mb": round(sizes["big"], 1), "small_mb": round(sizes["small"], 1),
                        "workers": args.workers, "cpus": os.cpu_count(), "repeats": args.repeats,
                        "load_before": load_text(), "runs": {}, "marginal": {}}
        print(f"corpus {big} ({sizes['big']:,.1f} MB; small run on its first {sizes['small']:,.1f} MB), "
              f"workers {args.workers}, best of {args.repeats}, load {report['load_before']}", flush=True)

        def measure(mode: str, size: str) -> dict:
            corpus = corpora.get(size, small)
            if mode == "ours":
                r = bench_ours(corpus, work / f"ours_{size}", args.workers)
            elif mode == "megatron_lm":
                r = bench_megatron(corpus, work / f"megatron_{size}", args.workers, args.megatron_lm.resolve(),
                                   args.megatron_pythonpath)
            elif mode == "startup":
                r = bench_startup(work, small)
                r["cpu_seconds"] = r["seconds"]
            else:
                r = bench_encoder(corpus, mode, args.workers)
            r.pop("output", None)
            r["load_after"] = load_text()
            return r

        def show(name: str, r: dict) -> None:
            if name.startswith("startup"):
                print(f"{'startup':<22} --help {r['help_s']:.2f} s, 5-document run {r['tiny_run_s']:.2f} s  "
                      f"(load {r['load_after']})", flush=True)
                return
            rss = f"  peak RSS {r['peak_rss_gb']:.2f} GB" if r.get("peak_rss_gb") else ""
            print(f"{name:<22} {r['seconds']:8.2f} s  {r['cpu_seconds']:8.2f} CPU s{rss}  (load {r['load_after']})",
                  flush=True)

        measurements = {f"{mode}/{size}": (lambda mode=mode, size=size: measure(mode, size))
                        for mode in modes for size in ("small", "big")}
        if "ours" in modes:
            measurements["startup/tiny"] = lambda: measure("startup", "tiny")
        comparison = compare(measurements, speed=lambda r: 1 / max(r["seconds"], 1e-9), repeats=args.repeats,
                             on_result=show)
        report["runs"] = comparison.best
        if "startup/tiny" in comparison.best:
            report["startup"] = {k: comparison.best["startup/tiny"][k] for k in ("help_s", "tiny_run_s")}
        print(f"\nmarginal: the {sizes['big'] - sizes['small']:,.1f} MB the big run has beyond the small one")
        for mode in modes:
            m = report["marginal"][mode] = marginal(comparison.best[f"{mode}/small"], comparison.best[f"{mode}/big"],
                                                    sizes["small"], sizes["big"])
            rss = f"  peak RSS {m['peak_rss_gb']:.2f} GB" if m["peak_rss_gb"] else ""
            print(f"{mode:<14} {m['mb_per_s']:8.1f} MB/s  {m['mb_per_cpu_s']:8.1f} MB/CPU-s  "
                  f"(runs {m['small_s']:.2f} s / {m['big_s']:.2f} s){rss}")
        if "ours" in modes and "megatron_lm" in modes:
            report["megatron_check"] = compare_ids(str(work / "ours_big_text_document"),
                                                   str(work / "megatron_big_text_document"))
            print(report["megatron_check"])
        for base in BASELINES:
            if "ours" in modes and base in modes:
                ours, other = report["marginal"]["ours"], report["marginal"][base]
                ratio = {"wall": ours["mb_per_s"] / other["mb_per_s"], "cpu": ours["mb_per_cpu_s"] / other["mb_per_cpu_s"]}
                report[f"ours_vs_{base}"] = ratio
                print(f"ours / {base:<14} {ratio['wall']:6.2f}x marginal MB/s, {ratio['cpu']:6.2f}x marginal MB per CPU-second")
        if "startup" in report:
            print(f"start-up: preprocess --help {report['startup']['help_s']:.2f} s, "
                  f"a 5-document run {report['startup']['tiny_run_s']:.2f} s")
        report["load_after"] = load_text()
        print(f"load {report['load_before']} before, {report['load_after']} after")
        if args.json:
            atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
