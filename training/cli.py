"""The trainer's command line: the module torchrun starts on every rank.

    torchrun --nproc-per-node 2 -m qwen_pretrain.training.cli --recipe qwen3_tiny --mock-data
    qwen-pretrain train --recipe qwen3_tiny --mock-data --nproc 2      # spawns torchrun itself

`qwen-pretrain train` (launch/train_cmd.py) takes the same arguments; with `--nproc` it starts
torchrun on this machine, without it it runs `run_train` in its own process.

Recipe overrides (`--tp --pp ... --seed --train-steps`) go through `recipes.override` and
`recipes.check_layout`, so the acceptance table is guarded (`--off-benchmark`) and impossible
layouts fail before any process starts. The layout's GPU count is the torchrun world size.

`--device cuda|cpu` names the target (default: cuda where CUDA is visible, else cpu for the tiny
recipes; any other recipe is refused without CUDA). `--print-config` prints the run settings of
`training/run_settings.py` as one JSON object and starts nothing, on any machine: for cuda it
assumes Transformer Engine, as in the NGC images (`--no-te` describes a GPU host without it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from qwen_pretrain.recipes.cli_args import add_recipe_args
from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.training.run_settings import DEVICES


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    # The recipe overrides every recipe-taking command shares; the GPU count is the world size.
    add_recipe_args(p, gpus_option=False, recompute_option=False)
    training = p.add_argument_group("training (defaults: the recipe's)")
    training.add_argument("--eval-interval", type=int, default=None, help="validate every N steps (0: never)")
    training.add_argument("--eval-iters", type=int, default=None, help="global batches per validation")
    training.add_argument("--lr", type=float, default=None)
    data = p.add_argument_group("data")
    src = data.add_mutually_exclusive_group()
    src.add_argument("--data-path", nargs="+", metavar="W_OR_PREFIX",
                     help="PREFIX or W1 PREFIX1 W2 PREFIX2 ... (Megatron .bin/.idx prefixes)")
    src.add_argument("--mock-data", action="store_true", help="megatron-core MockGPTDataset (the default without --data-path)")
    data.add_argument("--split", default=None, help="train,valid,test weights (default: the recipe's)")
    data.add_argument("--reset-attention-mask-at-eod", action="store_true",
                      help="reset position ids and the attention mask at each EOD (no attention across documents)")
    run = p.add_argument_group("run")
    run.add_argument("--load", help="resume from this checkpoint directory (latest iteration)")
    run.add_argument("--save", help="write torch_dist checkpoints here")
    run.add_argument("--save-interval", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    run.add_argument("--log-dir", help="train.log, metrics.jsonl and TensorBoard scalars go here")
    run.add_argument("--on-nan", choices=("stop", "skip"), default="stop",
                     help="a non-finite loss stops the run (default) or skips that update")
    run.add_argument("--gpu", help="accelerator for MFU (h100 h200 b200 a100 910b; guessed on GPU)")
    run.add_argument("--stop-after", type=int, default=None,
                     help="stop before this step (the LR schedule still spans --train-steps)")
    run.add_argument("--nproc", type=int, default=None,
                     help="spawn torchrun with this many local processes (CPU demo, one node)")
    target = p.add_argument_group("target")
    target.add_argument("--device", choices=DEVICES, default=None,
                        help="cuda or cpu (default: cuda where CUDA is visible; without it only the tiny "
                             "recipes default to cpu)")
    target.add_argument("--no-te", action="store_true",
                        help="the GPU target has no Transformer Engine: local layer spec, no TE kernels")
    target.add_argument("--print-config", action="store_true",
                        help="print the run settings (layer spec, precision, fusions, DDP, environment) "
                             "as JSON and start nothing")


def data_from_args(data: Any, args: argparse.Namespace) -> Any:
    """`data` with the command line's `--data-path` / `--mock-data` / `--split` applied."""
    from qwen_pretrain.training import data as data_mod

    if args.data_path:
        data = dataclasses.replace(data, blend=data_mod.parse_data_path(args.data_path))
    elif args.mock_data:
        data = dataclasses.replace(data, blend=())
    if args.split:
        data = dataclasses.replace(data, split=args.split)
    return data


def training_recipe_from_args(args: argparse.Namespace, world_size: int | None = None) -> Any:
    """The recipe with the command line's overrides and the trainer's own options (eval cadence,
    LR, data), validated for `world_size` processes. The shared recipe options alone are
    `recipes.cli_args.recipe_from_args`, which this builds on."""
    from qwen_pretrain.recipes import check_layout
    from qwen_pretrain.recipes.cli_args import recipe_from_args

    recipe = recipe_from_args(
        args, gpus=world_size, validate=False,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters, lr=args.lr,
    )
    data = data_from_args(recipe.data, args)
    if args.reset_attention_mask_at_eod:
        data = dataclasses.replace(data, reset_position_ids=True, reset_attention_mask=True)
    recipe = dataclasses.replace(recipe, data=data)
    check_layout(recipe)
    return recipe


def target_settings(args: argparse.Namespace, recipe: Any) -> Any:
    """The settings `--print-config` shows: the named (or default) device, Transformer Engine
    assumed on cuda unless `--no-te`. Only the default device looks at this machine."""
    from qwen_pretrain.training.run_settings import cuda_visible, default_device, run_settings

    device = args.device or default_device(recipe, cuda_visible())
    return run_settings(recipe, device, transformer_engine=not args.no_te)


def print_config(args: argparse.Namespace, world_size: int | None = None) -> int:
    """`--print-config`: the recipe's run settings as one JSON object on stdout."""
    import json

    recipe = training_recipe_from_args(args, world_size)
    settings = target_settings(args, recipe)
    print(json.dumps({"recipe": recipe.name, **settings.to_dict()}, indent=2))
    return 0


def run_train(args: argparse.Namespace) -> int:
    """Train in this process, one rank of the world torchrun started."""
    if args.print_config:
        world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
        if os.environ.get("RANK", "0") != "0":
            return 0
        return print_config(args, world)
    if args.nproc:
        raise UserError("--nproc spawns torchrun: run `qwen-pretrain train ... --nproc N` instead")
    if "WORLD_SIZE" not in os.environ:
        raise UserError(
            "train runs under torchrun: `torchrun --nproc-per-node N -m qwen_pretrain.training.cli ...`, "
            "or pass --nproc N to spawn it on this machine"
        )
    from qwen_pretrain.training.run_settings import settings_for_this_host
    from qwen_pretrain.training.train import TrainOptions, train

    recipe = training_recipe_from_args(args, int(os.environ["WORLD_SIZE"]))
    settings = settings_for_this_host(recipe, args.device, no_te=args.no_te)
    opts = TrainOptions(
        load=args.load, save=args.save, save_interval=args.save_interval, log_dir=args.log_dir,
        on_nan=args.on_nan, gpu=args.gpu, stop_after=args.stop_after,
    )
    try:
        train(recipe, opts, settings)
    finally:
        from qwen_pretrain.training.parallel import destroy_parallel

        destroy_parallel()
    return 0


def quiet_library_warnings() -> None:
    """Silence torch/megatron warnings that repeat every step and say nothing about the run."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Not megatron-core's CUDA_DEVICE_MAX_CONNECTIONS warning: the launchers export it (see
    # run_settings.GPU_ENVIRONMENT), so the warning means a launch went around them.
    for pattern in (
        ".*Transformer Engine and Apex are not installed.*",
        ".*is not a leaf Tensor is being accessed.*",
        ".*path_to_cache is None.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m qwen_pretrain.training.cli` (one torchrun worker)."""
    quiet_library_warnings()
    parser = argparse.ArgumentParser(prog="qwen-pretrain train")
    add_train_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        return run_train(args)
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"qwen-pretrain train: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
