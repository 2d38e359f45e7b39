"""`qwen-pretrain eval ppl|generate` and the `bench generate` action (added by benchmarks/cli.py).

    qwen-pretrain eval ppl --hf out/hf --data heldout.jsonl --seq-length 128 --stride 64
    qwen-pretrain eval ppl --mcore out/ckpt --recipe qwen3_tiny --data out/heldout_text_document
    qwen-pretrain eval generate --hf out/hf --prompts prompts.txt --seed 0
    qwen-pretrain bench generate --hf out/hf --batch 1 --prompt-len 64 --new-tokens 64

Results are JSON on stdout (`--out FILE` also writes them, atomically); `bench generate` prints
a table, or JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json

from qwen_pretrain.recipes.cli_args import positive_int


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="perplexity on held-out text; seeded generations with sanity metrics",
                              description="Check a trained model: sliding-window perplexity (HF or megatron-core) "
                              "and sampled generations with distinct-n, repetition and EOS metrics.")
    actions = p.add_subparsers(dest="eval_action", metavar="ACTION", required=True)

    ppl = actions.add_parser("ppl", help="token-level perplexity, sliding window",
                             description="Perplexity over a jsonl/parquet file (tokenized, EOD after each document) "
                             "or a .bin/.idx prefix: windows of --seq-length tokens every --stride tokens, only the "
                             "new tokens of each window scored.")
    src = ppl.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="DIR", help="Hugging Face model directory (config.json + safetensors)")
    src.add_argument("--mcore", metavar="DIR", help="torch_dist checkpoint: the trainer's --save dir or an iter_ dir")
    ppl.add_argument("--recipe", help="model shape of --mcore when it has no conversion.json (e.g. qwen3_tiny)")
    ppl.add_argument("--data", required=True, metavar="PATH", help="jsonl / parquet file or .bin/.idx prefix")
    ppl.add_argument("--tokenizer", metavar="DIR",
                     help="tokenizer of the model (default: the --hf dir's own, else the Qwen files)")
    ppl.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY")
    ppl.add_argument("--seq-length", type=positive_int, default=128, metavar="L", help="window length (default 128)")
    ppl.add_argument("--stride", type=positive_int, default=None, metavar="S", help="window step (default L/2)")
    ppl.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass")
    ppl.add_argument("--max-tokens", type=positive_int, default=None, help="score only the first T tokens of the data")
    ppl.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                     help="where the model and its inputs go (default cpu, on any host; --mcore builds "
                          "megatron-core's local layer spec there)")
    ppl.add_argument("--out", metavar="FILE", help="also write the JSON here")
    ppl.add_argument("--no-progress", action="store_true")
    ppl.set_defaults(func=cmd_ppl)

    gen = actions.add_parser("generate", help="seeded sampling from prompts, with sanity metrics")
    gen.add_argument("--hf", required=True, metavar="DIR")
    gen.add_argument("--prompts", required=True, metavar="FILE", help="one prompt per line, or jsonl with \"prompt\"")
    gen.add_argument("--tokenizer", metavar="DIR")
    gen.add_argument("--max-new-tokens", type=positive_int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", metavar="FILE", help="also write the JSON here")
    gen.set_defaults(func=cmd_generate)


def add_bench_generate(actions: argparse._SubParsersAction) -> None:
    """`bench generate`: called from benchmarks/cli.py with its subparsers."""
    b = actions.add_parser("generate", help="generation speed: time to first token, decode tokens/s, peak memory",
                           description="Greedy decoding of seeded random prompts with the KV cache; median of "
                           "--repeats after --warmup. Peak memory: CUDA max allocated on GPU, peak RSS on CPU.")
    b.add_argument("--hf", required=True, metavar="DIR")
    b.add_argument("--batch", type=positive_int, default=1)
    b.add_argument("--prompt-len", type=positive_int, default=64)
    b.add_argument("--new-tokens", type=positive_int, default=64)
    b.add_argument("--repeats", type=positive_int, default=3)
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    b.add_argument("--baseline", action="store_true", help="also time transformers' generate() and print the ratio")
    b.add_argument("--json", action="store_true", help="print JSON instead of the table")
    b.add_argument("--out", metavar="FILE", help="also write the JSON here")
    b.set_defaults(func=cmd_bench_generate)


def cmd_ppl(args: argparse.Namespace) -> int:
    from qwen_pretrain.evaluation.generation import write_json
    from qwen_pretrain.evaluation.perplexity import hf_scorer, load_token_stream, mcore_scorer, perplexity

    if args.hf:
        scorer = hf_scorer(args.hf, args.tokenizer, device=args.device)
    else:
        scorer = mcore_scorer(args.mcore, args.recipe, args.tokenizer, device=args.device)
    ids = load_token_stream(args.data, scorer.tokenizer, tuple(args.json_keys), args.max_tokens)
    stride = args.stride or max(1, args.seq_length // 2)
    result = perplexity(scorer, ids, seq_length=args.seq_length, stride=stride, batch_size=args.batch_size,
                        data_name=args.data, progress=False if args.no_progress else None)
    payload = result.to_dict()
    print(json.dumps(payload, indent=2))
    if args.out:
        write_json(args.out, payload)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from qwen_pretrain.evaluation.generation import generate_texts, read_prompts, write_json

    prompts = read_prompts(args.prompts)
    report = generate_texts(args.hf, prompts, tokenizer=args.tokenizer, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    payload = report.to_dict()
    for g in payload["generations"]:
        del g["token_ids"]
    print(json.dumps(payload, indent=2, ensure_ascii=False))
    if args.out:
        write_json(args.out, payload)
    return 0


def cmd_bench_generate(args: argparse.Namespace) -> int:
    from qwen_pretrain.evaluation.generation import bench_generate, speed_table, write_json

    speed = bench_generate(args.hf, batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                           repeats=args.repeats, warmup=args.warmup, seed=args.seed, dtype=args.dtype,
                           baseline=args.baseline)
    print(json.dumps(speed.to_dict(), indent=2) if args.json else speed_table(speed))
    if args.out:
        write_json(args.out, speed.to_dict())
    return 0
