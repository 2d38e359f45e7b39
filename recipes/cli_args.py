"""The recipe-override options shared by every command that takes a recipe.

`recipes show`, `train` and `launch` all call `add_recipe_args(parser)` and
`recipe_from_args(args)`, so an option means the same thing everywhere. (`train` leaves out
`--gpus`, since its GPU count is torchrun's world size, and `--recompute`, which the trainer
does not implement.)
"""

from __future__ import annotations

import argparse
from typing import Any

from qwen_pretrain.recipes import Recipe, check_layout, get_recipe, override


def add_recipe_args(
    parser: argparse.ArgumentParser,
    *,
    recipe_positional: bool = False,
    gpus_option: bool = True,
    recompute_option: bool = True,
) -> None:
    if recipe_positional:
        parser.add_argument("recipe", metavar="NAME", help="recipe name (see `recipes list`)")
    else:
        parser.add_argument("--recipe", required=True, metavar="NAME", help="recipe name (see `recipes list`)")
    g = parser.add_argument_group("recipe overrides (parallelism is free; batch/seq/seed need --off-benchmark)")
    if gpus_option:
        g.add_argument("--gpus", type=int, help="total GPUs (processes); default: the recipe's")
    g.add_argument("--tp", type=int, help="tensor parallel size")
    g.add_argument("--pp", type=int, help="pipeline parallel size")
    g.add_argument("--vpp", type=int, help="virtual pipeline stages per PP rank (0: off)")
    g.add_argument("--cp", type=int, help="context parallel size")
    g.add_argument("--ep", type=int, help="expert parallel size")
    g.add_argument("--etp", type=int, help="expert tensor parallel size")
    g.add_argument("--sp", dest="sequence_parallel", action="store_true", default=None, help="sequence parallel on")
    g.add_argument("--no-sp", dest="sequence_parallel", action="store_false", help="sequence parallel off")
    g.add_argument("--mbs", type=int, help="micro batch size")
    if recompute_option:
        g.add_argument("--recompute", choices=("none", "selective", "full"))
    g.add_argument("--gbs", type=int, help="global batch size (acceptance recipes: needs --off-benchmark)")
    g.add_argument("--seq-length", type=int, help="sequence length (acceptance recipes: needs --off-benchmark)")
    g.add_argument("--seed", type=int, help="random seed (acceptance recipes: needs --off-benchmark)")
    g.add_argument("--train-steps", type=int, help="training steps")
    g.add_argument(
        "--off-benchmark", action="store_true",
        help="allow changing what the acceptance table fixes; the run is then marked OFF-BENCHMARK",
    )


def recipe_from_args(
    args: argparse.Namespace, *, gpus: int | None = None, validate: bool = True, **extra: Any
) -> Recipe:
    """The recipe named by the arguments with their overrides applied (and validated).

    `gpus` stands in for `--gpus` (the trainer passes its world size); `extra` holds further
    `override` fields a command adds on top of the shared options (e.g. `lr=`).
    """
    recipe = override(
        get_recipe(args.recipe),
        gpus=gpus if gpus is not None else getattr(args, "gpus", None),
        off_benchmark=args.off_benchmark,
        tp=args.tp, pp=args.pp, vpp=args.vpp, cp=args.cp, ep=args.ep, etp=args.etp,
        sequence_parallel=args.sequence_parallel, mbs=args.mbs,
        recompute=getattr(args, "recompute", None),
        gbs=args.gbs, seq_length=args.seq_length, seed=args.seed, train_steps=args.train_steps,
        **extra,
    )
    if validate:
        check_layout(recipe)
    return recipe


def off_benchmark_banner(recipe: Recipe) -> str | None:
    """The line every output prints for a run that departs from the acceptance table."""
    if not recipe.off_benchmark:
        return None
    acc = recipe.acceptance
    assert acc is not None
    t = recipe.training
    return (
        f"OFF-BENCHMARK: {recipe.name} runs with GPUs={recipe.gpus}, global_batch_size="
        f"{t.global_batch_size}, seq_length={t.seq_length}, seed={t.seed}; the acceptance table "
        f"fixes GPUs>={acc.gpus}, {acc.global_batch_size}, {acc.seq_length}, {acc.seed}"
    )


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value
