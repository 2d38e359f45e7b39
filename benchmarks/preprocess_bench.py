"""Preprocessing throughput and memory, side by side on one corpus in one run.

    .venv/bin/python -m qwen_pretrain.benchmarks.preprocess_bench --make-corpus-mb 100 --workers 2 \\
        [--megatron-lm DIR [--megatron-pythonpath EXTRA]] [--only ours] [--json OUT]

Runs on the same jsonl corpus (field `text`):
- `ours`: `qwen-pretrain preprocess` as a user runs it (a subprocess; wall time includes start-up);
- `gigatoken`: the bare tokenizer's `encode_batch` on texts already in memory (encode time only):
  the ceiling for any pipeline built around it;
- `hf_tokenizers`: Hugging Face `tokenizers` `encode_batch`, the plain baseline (encode time only);
- `megatron_lm`: Megatron-LM's `tools/preprocess_data.py` (HuggingFaceTokenizer, --append-eod)
  when `--megatron-lm` points at a checkout; `--megatron-pythonpath` adds folders it needs.
Peak RSS is that of the whole process tree (main + workers, summed; pages shared after fork
count once per process, so this overstates physical memory; see `benchmarks/harness.py`). Besides
wall-clock MB/s it reports MB per CPU-second (user + system of the whole process tree), which
stays comparable when other jobs share the cores and the load changes between the runs.
`--make-corpus-mb N` builds the corpus under /tmp from real text on this machine (CPython's
standard library and /usr/share/doc), documents of random paragraphs, and deletes it after.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from qwen_pretrain.benchmarks.harness import compare, load_text, run_child
from qwen_pretrain.recipes.files import atomic_write_text

TOKENIZER_MODES = ("ours", "gigatoken", "hf_tokenizers", "megatron_lm")


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


def run_command(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    run = run_child(cmd, env=env, cwd=cwd, merge_stderr=True)
    if not run.ok:
        raise SystemExit(f"{cmd[0]} failed ({run.exit_code}):\n{run.stdout[-3000:]}")
    # CPU seconds of the whole tree (workers are waited for by their parent, so they count)
    return {"seconds": run.wall_s, "cpu_seconds": run.cpu_s, "peak_rss_gb": run.peak_rss_bytes / 1e9,
            "output": run.stdout}


def bench_ours(corpus: Path, out_dir: Path, workers: int) -> dict:
    cli = Path(sys.executable).parent / "qwen-pretrain"
    result = run_command([str(cli), "preprocess", "--input", str(corpus), "--output-prefix", str(out_dir / "ours"),
                          "--workers", str(workers), "--no-progress"])
    tokens = next(int(line.split()[3].replace(",", "")) for line in result["output"].splitlines() if line.startswith("written"))
    backend = next(line.split()[1] for line in result["output"].splitlines() if line.startswith("tokenizer"))
    return {**result, "tokens": tokens, "backend": backend}


def _texts_in_batches(corpus: Path, batch_bytes: int = 64 << 20):
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


def bench_tokenizer(corpus: Path, which: str, workers: int) -> dict:
    """Encode time only (texts read and parsed beforehand, batch by batch, untimed)."""
    from qwen_pretrain.preprocessing.tokenizer import qwen_tokenizer_dir

    path = qwen_tokenizer_dir() / "tokenizer.json"
    if which == "gigatoken":
        import gigatoken

        tok = gigatoken.Tokenizer(path)
        tok.encode_batch(["warm-up"], parallel=False)
        encode = lambda texts: sum(len(x) for x in tok.encode_batch_list(texts, parallel=workers > 1))  # noqa: E731
    else:
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(str(path))
        encode = lambda texts: sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))  # noqa: E731
    seconds = cpu = tokens = 0.0
    for texts in _texts_in_batches(corpus):
        started, cpu_started = time.perf_counter(), time.process_time()  # process_time: all threads
        tokens += encode(texts) + len(texts)  # + one EOD per document, as the pipeline writes
        seconds += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": int(tokens)}


def bench_megatron(corpus: Path, out_dir: Path, workers: int, checkout: Path, extra: str | None) -> dict:
    from qwen_pretrain.preprocessing.tokenizer import qwen_tokenizer_dir

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(checkout)] + ([extra] if extra else []) + [env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(checkout / "tools" / "preprocess_data.py"), "--input", str(corpus),
           "--output-prefix", str(out_dir / "megatron"), "--tokenizer-type", "HuggingFaceTokenizer",
           "--tokenizer-model", str(qwen_tokenizer_dir()), "--workers", str(workers), "--append-eod"]
    # run outside the repository, so nothing of Megatron-LM's lands here
    result = run_command(cmd, env=env, cwd=str(out_dir))
    return result


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", type=Path, help="an existing jsonl with field 'text'")
    src.add_argument("--make-corpus-mb", type=int, help="build a corpus of this many MB under /tmp (deleted after)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--megatron-lm", type=Path, help="a Megatron-LM checkout (tools/preprocess_data.py)")
    p.add_argument("--megatron-pythonpath", help="extra PYTHONPATH for Megatron-LM (e.g. a folder with six)")
    p.add_argument("--only", nargs="+", choices=TOKENIZER_MODES, help="run only these")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="preprocess_bench_", dir="/tmp"))
    try:
        corpus = args.corpus or make_corpus(work / "corpus.jsonl", args.make_corpus_mb)
        mb = corpus.stat().st_size / 1e6
        modes = args.only or [m for m in TOKENIZER_MODES if m != "megatron_lm" or args.megatron_lm]
        report: dict = {"corpus": str(corpus), "corpus_mb": round(mb, 1), "workers": args.workers,
                        "cpus": os.cpu_count(), "load_before": load_text(), "runs": {}}
        print(f"corpus {corpus} ({mb:,.1f} MB), workers {args.workers}, load {report['load_before']}", flush=True)

        def measure(mode: str) -> dict:
            if mode == "ours":
                r = bench_ours(corpus, work, args.workers)
            elif mode == "megatron_lm":
                if not args.megatron_lm:
                    raise SystemExit("--only megatron_lm needs --megatron-lm DIR")
                r = bench_megatron(corpus, work, args.workers, args.megatron_lm.resolve(), args.megatron_pythonpath)
            else:
                r = bench_tokenizer(corpus, "gigatoken" if mode == "gigatoken" else "tokenizers", args.workers)
            r.pop("output", None)
            r["mb_per_s"] = mb / r["seconds"]
            r["mb_per_cpu_s"] = mb / r["cpu_seconds"]
            r["load_after"] = load_text()
            return r

        def show(mode: str, r: dict) -> None:
            rss = f", peak RSS {r['peak_rss_gb']:.2f} GB" if "peak_rss_gb" in r else ""
            print(f"{mode:<14} {r['seconds']:8.1f} s  {r['mb_per_s']:8.1f} MB/s  {r['cpu_seconds']:8.1f} CPU s  "
                  f"{r['mb_per_cpu_s']:8.1f} MB/CPU-s{rss}  (load {r['load_after']})", flush=True)

        measurements = {mode: (lambda mode=mode: measure(mode)) for mode in modes}
        comparison = compare(measurements, speed=lambda r: r["mb_per_s"], on_result=show)
        runs = report["runs"] = comparison.best
        if "ours" in runs and "megatron_lm" in runs:
            report["megatron_check"] = compare_ids(str(work / "ours_text_document"), str(work / "megatron_text_document"))
            print(report["megatron_check"])
        for base in ("gigatoken", "hf_tokenizers", "megatron_lm"):
            if "ours" in runs and base in runs:
                ratio = comparison.ratio("ours", base)
                cpu_ratio = comparison.ratio("ours", base, speed=lambda r: r["mb_per_cpu_s"])
                report[f"ours_vs_{base}"] = {"wall": ratio, "cpu": cpu_ratio}
                print(f"ours / {base:<14} {ratio:6.2f}x wall-clock MB/s, {cpu_ratio:6.2f}x MB per CPU-second")
        if args.json:
            atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
