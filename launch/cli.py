"""The `qwen-pretrain` command: one subcommand per area of the repository.

Each subcommand module exposes `add_parser(subparsers)` and sets `func` on its parser; the
function returns the exit code. Modules must import heavy libraries (torch, megatron) inside
their functions so that `qwen-pretrain --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from qwen_pretrain.recipes.errors import UserError

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "qwen_pretrain.recipes.cli",
    "qwen_pretrain.preprocessing.cli",
    "qwen_pretrain.preprocessing.tokenizer_cli",
    "qwen_pretrain.evaluation.cli",
    "qwen_pretrain.benchmarks.cli",
    "qwen_pretrain.benchmarks.reference_trainer",
    "qwen_pretrain.launch.launcher",
    "qwen_pretrain.launch.train_cmd",
    "qwen_pretrain.launch.demo",
    "qwen_pretrain.conversion.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-pretrain",
        description="Pretrain Qwen3 / Qwen2.5 on Megatron-core and NeMo: recipes, data, "
        "training, conversion, launch and acceptance benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"qwen-pretrain {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"qwen-pretrain {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
