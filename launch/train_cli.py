"""`qwen-pretrain train`: train a recipe on Megatron-core (started by torchrun).

    torchrun --nproc-per-node 2 -m qwen_pretrain.launch.train_cli --recipe qwen3_tiny --mock-data
    qwen-pretrain train --recipe qwen3_tiny --mock-data --nproc 2      # spawns torchrun itself

Recipe overrides (`--tp --pp ... --seed --train-steps`) go through `recipes.override` and
`recipes.check_layout`, so the acceptance table is guarded (`--off-benchmark`) and impossible
layouts fail before any process starts. The layout's GPU count is the torchrun world size.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from typing import Any

from qwen_pretrain.recipes.cli_args import add_recipe_args
from qwen_pretrain.recipes.errors import UserError


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


def recipe_from_args(args: argparse.Namespace, world_size: int | None = None) -> Any:
    """The recipe with the command line's overrides, validated for `world_size` processes."""
    from qwen_pretrain.launch import data as data_mod
    from qwen_pretrain.recipes import check_layout
    from qwen_pretrain.recipes.cli_args import recipe_from_args as shared_recipe_from_args

    recipe = shared_recipe_from_args(
        args, gpus=world_size, validate=False,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters, lr=args.lr,
    )
    data = recipe.data
    if args.data_path:
        data = dataclasses.replace(data, blend=data_mod.parse_data_path(args.data_path))
    elif args.mock_data:
        data = dataclasses.replace(data, blend=())
    if args.split:
        data = dataclasses.replace(data, split=args.split)
    if args.reset_attention_mask_at_eod:
        data = dataclasses.replace(data, reset_position_ids=True, reset_attention_mask=True)
    recipe = dataclasses.replace(recipe, data=data)
    check_layout(recipe)
    return recipe


def torchrun_command(argv: list[str], nproc: int, port: int | None = None) -> list[str]:
    """The torchrun command that runs this module with `argv` (minus --nproc) on one node."""
    cleaned, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        cleaned.append(a)
    from qwen_pretrain.launch.torchrun import Entry, NodeEnv
    from qwen_pretrain.launch.torchrun import torchrun_command as node_command

    if port is None:
        from qwen_pretrain.launch.parallel import _free_port

        port = _free_port()
    node = NodeEnv(master_addr="127.0.0.1", master_port=port, nnodes=1, node_rank=0, gpus_per_node=nproc)
    return node_command(node, Entry(sys.executable, tuple(cleaned), module="qwen_pretrain.launch.train_cli"))


def spawn(argv: list[str], nproc: int, env: dict[str, str] | None = None) -> int:
    """Run training under a fresh torchrun on this machine; returns its exit code."""
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: give at least 1")
    env = dict(os.environ if env is None else env)
    # On CPU each process gets its share of the cores (torch would take them all per process).
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return subprocess.run(torchrun_command(argv, nproc), env=env).returncode


def run_train(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    if args.nproc:
        recipe_from_args(args, args.nproc)  # fail fast, before any process starts
        return spawn(list(sys.argv[2:] if argv is None else argv), args.nproc)
    if "WORLD_SIZE" not in os.environ:
        raise UserError(
            "train runs under torchrun: `torchrun --nproc-per-node N -m qwen_pretrain.launch.train_cli ...`, "
            "or pass --nproc N to spawn it on this machine"
        )
    from qwen_pretrain.launch.train import TrainOptions, train

    recipe = recipe_from_args(args, int(os.environ["WORLD_SIZE"]))
    opts = TrainOptions(
        load=args.load, save=args.save, save_interval=args.save_interval, log_dir=args.log_dir,
        on_nan=args.on_nan, gpu=args.gpu, stop_after=args.stop_after,
    )
    try:
        train(recipe, opts)
    finally:
        from qwen_pretrain.launch.parallel import destroy_parallel

        destroy_parallel()
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a recipe on Megatron-core (under torchrun, or --nproc N to spawn it)",
        description=__doc__.split("\n\n")[0],
    )
    add_train_arguments(p)
    p.set_defaults(func=run_train)


def quiet_library_warnings() -> None:
    """Silence torch/megatron warnings that repeat every step and say nothing about the run."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for pattern in (
        ".*Transformer Engine and Apex are not installed.*",
        ".*CUDA_DEVICE_MAX_CONNECTIONS.*",
        ".*is not a leaf Tensor is being accessed.*",
        ".*path_to_cache is None.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m qwen_pretrain.launch.train_cli` (one torchrun worker)."""
    quiet_library_warnings()
    parser = argparse.ArgumentParser(prog="qwen-pretrain train")
    add_train_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        return run_train(args, argv)
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"qwen-pretrain train: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
