"""`qwen-pretrain recipes list|show|suggest`."""

from __future__ import annotations

import argparse

from qwen_pretrain.recipes import all_recipes


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("recipes", help="list, show, validate and plan recipes")
    sub = parser.add_subparsers(dest="recipes_command", metavar="ACTION", required=True)
    p_list = sub.add_parser("list", help="a table of all recipes")
    p_list.set_defaults(func=cmd_list)


def cmd_list(args: argparse.Namespace) -> int:
    rows = [("name", "family", "GPUs", "TPxPPxCPxEP", "GBS", "seq", "acceptance")]
    for r in all_recipes():
        p = r.parallel
        rows.append((
            r.name, r.model.family, str(r.gpus), f"{p.tp}x{p.pp}x{p.cp}x{p.ep}",
            str(r.training.global_batch_size), str(r.training.seq_length),
            "yes" if r.acceptance else ("tiny" if r.tiny else "-"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0
