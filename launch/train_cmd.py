"""`qwen-pretrain train`: train a recipe on Megatron-core (started by torchrun).

    qwen-pretrain train --recipe qwen3_tiny --mock-data --nproc 2      # spawns torchrun itself
    torchrun --nproc-per-node 2 -m qwen_pretrain.training.cli --recipe qwen3_tiny --mock-data
    qwen-pretrain train --recipe qwen3_8b --device cuda --print-config  # GPU settings, on any machine

Recipe overrides (`--tp --pp ... --seed --train-steps`) go through `recipes.override` and
`recipes.check_layout`, so the acceptance table is guarded (`--off-benchmark`) and impossible
layouts fail before any process starts. The layout's GPU count is the torchrun world size.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

from qwen_pretrain.launch.torchrun import TRAIN_MODULE, Entry, NodeEnv, torchrun_command, with_defaults
from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.training.cli import add_train_arguments, print_config, run_train, training_recipe_from_args
from qwen_pretrain.training.parallel import free_port


def local_torchrun_command(argv: list[str], nproc: int, port: int | None = None) -> list[str]:
    """The torchrun command that runs the trainer with `argv` (minus --nproc) on this machine."""
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
    node = NodeEnv(master_addr="127.0.0.1", master_port=port or free_port(), nnodes=1, node_rank=0,
                   gpus_per_node=nproc)
    return torchrun_command(node, Entry(sys.executable, tuple(cleaned), module=TRAIN_MODULE))


def spawn_environment(nproc: int, run_env: dict[str, str], env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a local torchrun: `env` (default: this process's) plus the run
    settings' exports and a share of the cores per process, each where not already set."""
    # On CPU each process gets its share of the cores (torch would take them all per process).
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    return with_defaults(os.environ if env is None else env, {**run_env, **threads})


def spawn(argv: list[str], nproc: int, env: dict[str, str] | None = None, run_env: dict[str, str] | None = None) -> int:
    """Run training under a fresh torchrun on this machine; returns its exit code."""
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: give at least 1")
    env = spawn_environment(nproc, run_env or {}, env)
    return subprocess.run(local_torchrun_command(argv, nproc), env=env).returncode


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    if args.print_config:
        return print_config(args, args.nproc)
    if args.nproc:
        from qwen_pretrain.training import run_settings as rs

        # Fail fast, before any process starts: the layout, and a device this machine lacks.
        recipe = training_recipe_from_args(args, args.nproc)
        device = args.device or rs.default_device(recipe, rs.cuda_visible())
        rs.check_device_visible(device)
        run_env = rs.run_settings(recipe, device).env  # the same whether the target has TE or not
        return spawn(list(sys.argv[2:] if argv is None else argv), args.nproc, run_env=run_env)
    return run_train(args)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a recipe on Megatron-core (under torchrun, or --nproc N to spawn it)",
        description=__doc__.split("\n\n")[0],
    )
    add_train_arguments(p)
    p.set_defaults(func=run)
