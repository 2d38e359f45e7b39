"""`qwen-pretrain recipes list|show|suggest`: print recipes, validate layouts, plan runs."""

from __future__ import annotations

import argparse
import json
import sys

from qwen_pretrain.recipes import UserError, all_recipes, get_recipe, override
from qwen_pretrain.recipes.cli_args import add_recipe_args, off_benchmark_banner, recipe_from_args
from qwen_pretrain.recipes.hardware import GPUS, get_gpu
from qwen_pretrain.recipes.planner import plan, suggest


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("recipes", help="list, show, validate and plan recipes")
    sub = parser.add_subparsers(dest="recipes_command", metavar="ACTION", required=True)

    p_list = sub.add_parser("list", help="a table of all recipes")
    p_list.set_defaults(func=cmd_list)

    p_show = sub.add_parser(
        "show", help="the resolved recipe, parameter counts, FLOPs, memory and time estimates"
    )
    add_recipe_args(p_show, recipe_positional=True)
    _add_gpu_args(p_show)
    p_show.add_argument("--json", action="store_true", help="print one JSON object")
    p_show.set_defaults(func=cmd_show)

    p_suggest = sub.add_parser("suggest", help="valid layouts that fit, best first")
    p_suggest.add_argument("recipe", metavar="NAME")
    p_suggest.add_argument("--gpus", type=int, required=True, help="total GPUs")
    p_suggest.add_argument("--gpu-mem-gb", type=float, help="memory per GPU (default: --gpu's)")
    p_suggest.add_argument("--gpus-per-node", type=int, default=8, help="TP stays within a node")
    p_suggest.add_argument("--top", type=int, default=10, help="how many layouts to print")
    p_suggest.add_argument("--off-benchmark", action="store_true", help="allow fewer GPUs than the baseline")
    _add_gpu_args(p_suggest)
    p_suggest.add_argument("--json", action="store_true")
    p_suggest.set_defaults(func=cmd_suggest)


def _add_gpu_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="accelerator for estimates")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization for estimates")


def cmd_list(args: argparse.Namespace) -> int:
    header = ("name", "family", "params", "GPUs", "TPxPPxCPxEP", "GBS", "seq", "acceptance")
    rows = [header]
    from qwen_pretrain.recipes.planner import param_counts

    for r in all_recipes():
        p = r.parallel
        total = param_counts(r.model).total
        size = f"{total / 1e9:.1f}B" if total >= 1e9 else f"{total / 1e6:.0f}M"
        acc = r.acceptance
        rows.append((
            r.name, r.model.family, size, str(r.gpus), f"{p.tp}x{p.pp}x{p.cp}x{p.ep}",
            str(r.training.global_batch_size), str(r.training.seq_length),
            f"{acc.gpus} GPUs, GBS {acc.global_batch_size}, seq {acc.seq_length}" if acc
            else ("tiny (CPU)" if r.tiny else "-"),
        ))
    _print_table(rows)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    if args.mfu <= 0 or args.mfu > 1:
        raise UserError(f"--mfu {args.mfu} must be in (0, 1]")
    recipe = recipe_from_args(args)
    result = plan(recipe, get_gpu(args.gpu), args.mfu)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    banner = off_benchmark_banner(recipe)
    if banner:
        print(banner)
    _print_plan(result)
    return 0


def cmd_suggest(args: argparse.Namespace) -> int:
    recipe = get_recipe(args.recipe)
    if args.gpus < 1:
        raise UserError(f"--gpus {args.gpus} must be at least 1")
    # Refuse fewer GPUs than the acceptance baseline up front (same rule as everywhere else).
    recipe = override(recipe, gpus=args.gpus, off_benchmark=args.off_benchmark)
    gpu = get_gpu(args.gpu)
    mem = args.gpu_mem_gb or gpu.memory_gb
    found = suggest(recipe, args.gpus, mem, gpu=gpu, gpus_per_node=args.gpus_per_node, limit=args.top)
    if args.json:
        json.dump(
            [
                {
                    "tp": s.recipe.parallel.tp, "pp": s.recipe.parallel.pp, "vpp": s.recipe.parallel.vpp,
                    "cp": s.recipe.parallel.cp, "ep": s.recipe.parallel.ep,
                    "dp": s.recipe.data_parallel_size, "mbs": s.recipe.parallel.micro_batch_size,
                    "grad_accum": s.recipe.grad_accum_steps, "memory_gb": round(s.memory_gb, 2),
                    "headroom_gb": round(s.headroom_gb, 2), "communication_gb_per_step": round(s.communication_gb, 2),
                    "pipeline_bubble": round(s.bubble, 4),
                }
                for s in found
            ],
            sys.stdout,
            indent=2,
        )
        print()
    if not found:
        print(
            f"no valid layout of {recipe.name} on {args.gpus} GPUs fits in {mem:g} GB per GPU "
            "(with a 5% margin); try more GPUs, a larger --gpu-mem-gb or full recompute",
            file=sys.stderr,
        )
        return 1
    if args.json:
        return 0
    print(f"{recipe.name} on {args.gpus} GPUs with {mem:g} GB each: least communication + pipeline-bubble time first")
    rows = [("TP", "PP", "VPP", "CP", "EP", "DP", "MBS", "accum", "mem GB", "headroom GB", "comm GB/step", "bubble")]
    for s in found:
        p = s.recipe.parallel
        rows.append((
            str(p.tp), str(p.pp), str(p.vpp or "-"), str(p.cp), str(p.ep), str(s.recipe.data_parallel_size),
            str(p.micro_batch_size), str(s.recipe.grad_accum_steps), f"{s.memory_gb:.1f}",
            f"{s.headroom_gb:.1f}", f"{s.communication_gb:.1f}", f"{s.bubble:.1%}",
        ))
    _print_table(rows)
    return 0


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _print_plan(r: dict) -> None:
    par, tr, mem, model = r["parallel"], r["training"], r["memory"], r["model"]
    acc = r["acceptance"]
    print(f"recipe       {r['name']}: {r['description']}")
    print(
        f"model        {model['hf_architecture']} hidden={model['hidden_size']} layers={model['num_layers']} "
        f"heads={model['num_attention_heads']}/{model['num_query_groups']} head_dim={model['head_dim']} "
        f"ffn={model['ffn_hidden_size']} vocab={model['vocab_size']} (padded {model['padded_vocab_size']}) "
        f"tied={model['tie_embeddings']} qkv_bias={model['qkv_bias']} qk_norm={model['qk_norm']}"
    )
    if model["num_experts"]:
        print(
            f"experts      {model['num_experts']} x ffn {model['moe_ffn_hidden_size']}, top-{model['moe_router_topk']}, "
            f"norm_topk_prob={model['moe_norm_topk_prob']}, aux_loss={model['moe_aux_loss_coeff']}"
        )
    print(
        f"layout       GPUs={r['gpus']} TP={par['tp']} PP={par['pp']} VPP={par['vpp'] or '-'} CP={par['cp']} "
        f"EP={par['ep']} ETP={par['etp']} DP={par['dp']} SP={par['sequence_parallel']} MBS={par['mbs']} "
        f"grad_accum={par['grad_accum']} recompute={par['recompute']} dist_opt={par['use_distributed_optimizer']}"
    )
    print(
        f"training     GBS={tr['global_batch_size']} seq={tr['seq_length']} seed={tr['seed']} "
        f"steps={tr['train_steps']} lr={tr['lr']:g}->{tr['min_lr']:g} {tr['lr_decay_style']} "
        f"warmup={tr['warmup_steps']} {tr['precision']} clip={tr['clip_grad']}"
    )
    print(
        "acceptance   "
        + (
            f">= {acc['gpus']} GPUs, GBS {acc['global_batch_size']}, seq {acc['seq_length']}, seed {acc['seed']}"
            if acc else "not an acceptance recipe"
        )
    )
    print(
        f"parameters   total {r['params_total'] / 1e9:.3f}B, active {r['params_active'] / 1e9:.3f}B, "
        f"non-embedding {r['params_non_embedding'] / 1e9:.3f}B"
    )
    print(f"FLOPs/token  {r['flops_per_token'] / 1e9:.2f} GFLOP (training, Megatron-LM accounting)")
    print(
        f"memory/GPU   {mem['total_gb']:.1f} GB = weights {mem['weights_gb']:.1f} + grads {mem['gradients_gb']:.1f} "
        f"+ optimizer {mem['optimizer_gb']:.1f} (without distributed optimizer "
        f"{mem['optimizer_gb_without_distributed']:.1f}) + activations {mem['activations_gb']:.1f} "
        f"+ overhead {mem['overhead_gb']:.1f}"
    )
    print(
        f"activations  no recompute {mem['activations_no_recompute_gb']:.1f} GB, selective "
        f"{mem['activations_selective_recompute_gb']:.1f} GB, full {mem['activations_full_recompute_gb']:.1f} GB"
    )
    gpu = r["gpu"]
    fits = "fits" if r["memory_gb_per_gpu"] <= gpu["memory_gb"] else "DOES NOT FIT"
    print(
        f"on {gpu['name']:<9}  {fits} in {gpu['memory_gb']:g} GB; at MFU {r['mfu']:g}: "
        f"{r['estimated_tokens_per_sec_per_gpu']:,.0f} tokens/s/GPU, step {r['estimated_step_time_s']:.2f} s, "
        f"{r['estimated_train_hours']:.2f} h for {tr['train_steps']} steps"
    )
