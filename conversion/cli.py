"""`qwen-pretrain convert hf-to-mcore | mcore-to-hf | verify`."""

from __future__ import annotations

import argparse
from pathlib import Path

from qwen_pretrain.recipes.cli_args import positive_int

VERIFY_TOLERANCE = 1e-5


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert weights between Hugging Face and Megatron-core")
    sub = parser.add_subparsers(dest="convert_command", metavar="DIRECTION", required=True)

    to_mcore = sub.add_parser("hf-to-mcore", help="Hugging Face safetensors -> Megatron-core checkpoint")
    to_mcore.add_argument("--hf", type=Path, required=True, help="Hugging Face model directory")
    to_mcore.add_argument("--out", type=Path, required=True, help="new checkpoint directory (must not exist)")
    to_mcore.add_argument("--recipe", help="recipe of the model (default: matched from config.json)")
    to_mcore.add_argument("--tp", type=positive_int, default=1)
    to_mcore.add_argument("--pp", type=positive_int, default=1)
    to_mcore.add_argument("--ep", type=positive_int, default=1)
    to_mcore.add_argument("--etp", type=positive_int, default=1, help="expert tensor parallel: 1 or --tp")
    to_mcore.add_argument("--vpp", type=positive_int, default=None, help="virtual pipeline stages per PP rank")
    to_mcore.add_argument("--format", choices=("torch_dist", "legacy"),
                          help="default torch_dist (legacy with --target mindspeed)")
    to_mcore.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="cast (default: keep)")
    to_mcore.add_argument("--layer-spec", choices=("local", "te"),
                          help="legacy format names (default local; --target mindspeed: its model's)")
    to_mcore.add_argument(
        "--expert-layout", choices=("sequential", "te_grouped", "legacy_grouped"),
        help="default sequential (--target mindspeed: its model's)",
    )
    to_mcore.add_argument("--target", choices=("megatron", "mindspeed"), default="megatron",
                          help="who loads it: Megatron-LM (default) or MindSpeed-LLM (Ascend NPUs)")
    to_mcore.add_argument("--quiet", action="store_true", help="no progress bar")
    to_mcore.set_defaults(func=_hf_to_mcore)

    to_hf = sub.add_parser("mcore-to-hf", help="Megatron-core checkpoint (any layout) -> Hugging Face")
    to_hf.add_argument("--mcore", type=Path, required=True, help="checkpoint directory (with the tracker file)")
    to_hf.add_argument("--out", type=Path, required=True, help="new Hugging Face directory (must not exist)")
    to_hf.add_argument("--recipe", help="recipe of the model (default: from the checkpoint's conversion.json)")
    to_hf.add_argument("--max-shard-gb", type=float, default=2.0)
    to_hf.add_argument("--quiet", action="store_true")
    to_hf.set_defaults(func=_mcore_to_hf)

    check = sub.add_parser("verify", help="compare logits: transformers vs Megatron-core (fp32, --device)")
    check.add_argument("--hf", type=Path, required=True)
    check.add_argument("--mcore", type=Path, required=True)
    check.add_argument("--recipe")
    check.add_argument("--tolerance", type=float, default=VERIFY_TOLERANCE)
    check.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="where both models and their inputs go (default cpu, on any host)")
    check.set_defaults(func=_verify)


def _target_defaults(args: argparse.Namespace) -> None:
    """Fill --format/--layer-spec/--expert-layout left out: Megatron-LM's defaults, or for
    --target mindspeed the layout of the model MindSpeed-LLM builds for the family."""
    defaults = ("torch_dist", "local", "sequential")
    if args.target == "mindspeed":
        from qwen_pretrain.conversion import hf_io
        from qwen_pretrain.conversion.legacy import mindspeed_layout

        shape, _ = hf_io.resolve_shape(hf_io.read_config(args.hf), args.recipe)
        defaults = ("legacy", *mindspeed_layout(shape))
    args.format = args.format or defaults[0]
    args.layer_spec = args.layer_spec or defaults[1]
    args.expert_layout = args.expert_layout or defaults[2]


def _hf_to_mcore(args: argparse.Namespace) -> int:
    from qwen_pretrain.conversion.convert import hf_to_mcore

    _target_defaults(args)
    out = hf_to_mcore(
        args.hf,
        args.out,
        recipe=args.recipe,
        tp=args.tp,
        pp=args.pp,
        ep=args.ep,
        vpp=args.vpp,
        etp=args.etp,
        fmt=args.format,
        dtype=args.dtype,
        layer_spec=args.layer_spec,
        expert_layout=args.expert_layout,
        quiet=args.quiet,
        target=args.target,
    )
    print(f"wrote {args.format} checkpoint {out} (tp={args.tp} pp={args.pp} ep={args.ep})")
    if args.target == "mindspeed":
        # legacy rank files are not resharded at load: MindSpeed-LLM must run the same layout
        print(f"MindSpeed-LLM loads it at TP {args.tp}, PP {args.pp}, EP {args.ep}: "
              f"qwen-pretrain launch --backend mindspeed --tp {args.tp} --pp {args.pp} --load {out} ...")
    if args.format == "torch_dist":
        from qwen_pretrain.conversion.checkpoint_info import read_info
        from qwen_pretrain.recipes.schema import ModelShape
        from qwen_pretrain.training.checkpoint_dir import loadable_tps

        shape = ModelShape(**read_info(out)["shape"])
        rows = shape.padded_vocab_size(args.tp)
        tps = [t for t in loadable_tps(shape, rows) if shape.num_query_groups % t == 0]
        # dist_checkpointing reshards TP/PP/EP at load, but not the embedding's padded rows
        print(f"its embedding has {rows} rows (vocabulary padded for TP {args.tp}): load it with --tp {', '.join(map(str, tps))}")
    return 0


def _mcore_to_hf(args: argparse.Namespace) -> int:
    from qwen_pretrain.conversion.convert import mcore_to_hf

    out = mcore_to_hf(args.mcore, args.out, recipe=args.recipe, max_shard_bytes=int(args.max_shard_gb * 1024**3), quiet=args.quiet)
    print(f"wrote Hugging Face checkpoint {out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from qwen_pretrain.conversion.convert import verify

    r = verify(args.hf, args.mcore, recipe=args.recipe, device=args.device)
    ok = r.ok(args.tolerance)
    print(
        f"verify: {r.prompts} prompts, {r.tokens} tokens: max |logit diff| {r.max_abs_diff:.3e} "
        f"(tolerance {args.tolerance:.0e}), top-1 agreement {r.top1_agreement:.2%}: {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1
