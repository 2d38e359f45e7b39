"""Regenerate the list of Megatron-LM `pretrain_gpt.py` flags that the renderer is checked against.

    python -m qwen_pretrain.launch.megatron_lm_flags --repo /path/to/Megatron-LM --tag core_v0.16.1

It exports `megatron/` of the tag with `git archive`, builds Megatron-LM's own argument parser
(`megatron.training.arguments.add_megatron_arguments`, which also adds the flags generated from
its config dataclasses, so reading `add_argument` calls is not enough) and writes one line per
flag, `--flag switch|value`, to `launch/megatron_lm_flags.txt`, with the tag and commit in the
header. Modules the parser never uses (e.g. `six`, `triton`) are stubbed when absent.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

from qwen_pretrain.recipes.files import atomic_write_text

FLAGS_FILE = Path(__file__).resolve().with_name("megatron_lm_flags.txt")


def read_flags(path: Path = FLAGS_FILE) -> dict[str, str]:
    """{flag: "switch" | "value"} from the committed flags file."""
    flags = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            flag, kind = line.split()
            flags[flag] = kind
    return flags


def flags_header(path: Path = FLAGS_FILE) -> dict[str, str]:
    """The `# key: value` lines of the flags file's header (tag, commit, ...)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("# ") and ": " in line:
            key, value = line[2:].split(": ", 1)
            out[key] = value
    return out


def _megatron_parser(src: Path) -> argparse.ArgumentParser:
    sys.path.insert(0, str(src))
    for _ in range(20):
        try:
            from megatron.training.arguments import add_megatron_arguments
            break
        except ModuleNotFoundError as err:
            if err.name is None or err.name.startswith("megatron"):
                raise
            for name in [m for m in sys.modules if m.startswith("megatron.training")]:
                del sys.modules[name]
            sys.modules[err.name] = mock.MagicMock(name=err.name)
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_megatron_arguments(parser)
    return parser


def generate(repo: Path, tag: str, out: Path = FLAGS_FILE) -> int:
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", f"{tag}^{{commit}}"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", tag, "megatron"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        parser = _megatron_parser(Path(tmp))
    rows = []
    for flag, action in sorted(parser._option_string_actions.items()):
        if flag.startswith("--"):
            rows.append(f"{flag} {'switch' if action.nargs == 0 else 'value'}")
    header = [
        "# Flags of Megatron-LM's pretrain_gpt.py argument parser (generated; do not edit).",
        "# source: NVIDIA/Megatron-LM megatron/training/arguments.py add_megatron_arguments",
        f"# tag: {tag}",
        f"# commit: {commit}",
        "# regenerate: python -m qwen_pretrain.launch.megatron_lm_flags --repo DIR --tag TAG",
        "# format: flag, then 'switch' (takes no value) or 'value'",
    ]
    atomic_write_text(out, "\n".join(header + rows) + "\n")
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", required=True, type=Path, help="a git clone of NVIDIA/Megatron-LM")
    p.add_argument("--tag", default="core_v0.16.1")
    p.add_argument("--out", type=Path, default=FLAGS_FILE)
    args = p.parse_args(argv)
    n = generate(args.repo, args.tag, args.out)
    print(f"wrote {n} flags of {args.tag} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
