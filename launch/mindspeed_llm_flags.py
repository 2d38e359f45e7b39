"""Regenerate the list of MindSpeed-LLM `pretrain_gpt.py` flags that the MindSpeed renderer is checked against.

    python -m qwen_pretrain.launch.mindspeed_llm_flags --mindspeed-llm DIR --mindspeed DIR --megatron-lm DIR

MindSpeed-LLM's parser is Megatron-LM's (`add_megatron_arguments` of the Megatron-LM release it
runs on) plus what every registered feature adds (`MindSpeedFeaturesManager.register_features_args`
over `create_features_list()` of `mindspeed_llm/features_manager/__init__.py`: features of
MindSpeed-LLM and of the MindSpeed core library), so reading `add_argument` calls is not enough.
Each MindSpeed-LLM release names its MindSpeed and Megatron-LM versions (README, install guide):
2.3.0 runs on MindSpeed 2.3.0_core_r0.12.1 and Megatron-LM core_v0.12.1, the defaults here.

This exports `mindspeed_llm/`, `mindspeed/` and `megatron/` of the three tags with `git archive`
and builds that parser without running MindSpeed-LLM's patching (`mindspeed_llm/__init__.py`
patches Megatron for NPUs on import, so the package is entered without it). Modules the parser
never uses (torch_npu, einops, ...) are stubbed when absent. It writes one line per flag to
`launch/mindspeed_llm_flags.txt`: `--flag switch|value|values [choice|choice|...]` ("values":
any number of values, e.g. `--data-path`, `--spec`), with the three tags and commits in the header.

With `--validate --tokenizer-dir DIR` it writes nothing and instead runs MindSpeed-LLM's own
argument validation (`validate_args_v2_decorator` around Megatron-LM's `validate_args`: every
feature's checks) on what `render_mindspeed` renders for each acceptance recipe at its GPU
count and for the Qwen3-1.7B flow (TP8, sequence 4096, 2,000 iterations), one line per case.
Nothing here has an NPU: the Ascend runtime modules it imports while validating (acl, torchair,
...) are stubbed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from qwen_pretrain.launch import megatron_lm_flags
from qwen_pretrain.recipes.files import atomic_write_text

FLAGS_FILE = Path(__file__).resolve().with_name("mindspeed_llm_flags.txt")
# (header key, archived folder, default tag); the header key names the repository.
SOURCES = (
    ("mindspeed-llm", "mindspeed_llm", "v2.3.0"),
    ("mindspeed", "mindspeed", "v2.3.0_core_r0.12.1"),
    ("megatron-lm", "megatron", "core_v0.12.1"),
)
SWITCH, VALUE, VALUES = "switch", "value", "values"


@dataclass(frozen=True)
class Flag:
    """One option of the parser: whether it takes no value, one, or a list; its choices if any."""

    kind: str
    choices: tuple[str, ...] = ()


def read_flags(path: Path = FLAGS_FILE) -> dict[str, Flag]:
    """{flag: Flag} from the committed flags file."""
    flags = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            flag, kind, *choices = line.split()
            flags[flag] = Flag(kind, tuple(choices[0].split("|")) if choices else ())
    return flags


def flags_header(path: Path = FLAGS_FILE) -> dict[str, str]:
    """The `# key: value` lines of the flags file's header (tags, commits, ...): the same header
    format as the Megatron-LM flags file."""
    return megatron_lm_flags.flags_header(path)


def flag_problems(argv: list[str], flags: dict[str, Flag] | None = None) -> list[str]:
    """Every way an argument list disagrees with the parser: an unknown flag, a switch given a
    value, a flag missing its value(s), a value outside the flag's choices."""
    flags = read_flags() if flags is None else flags
    problems: list[str] = []
    i = 0
    while i < len(argv):
        flag = argv[i]
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        values, i = argv[i + 1:j], j
        if not flag.startswith("--"):
            problems.append(f"{flag!r}: a value without a flag")
            continue
        spec = flags.get(flag)
        if spec is None:
            problems.append(f"{flag}: not a flag of MindSpeed-LLM's pretrain_gpt.py")
        elif spec.kind == SWITCH and values:
            problems.append(f"{flag} takes no value, got {values}")
        elif spec.kind == VALUE and len(values) != 1:
            problems.append(f"{flag} takes one value, got {values}")
        elif spec.kind == VALUES and not values:
            problems.append(f"{flag} takes values, got none")
        elif spec.choices and any(v not in spec.choices for v in values):
            problems.append(f"{flag} {' '.join(values)}: not one of {', '.join(spec.choices)}")
    return problems


def _bare_package(name: str, src: Path) -> None:
    """Enter a package without running its `__init__` (MindSpeed-LLM's patches Megatron on import)."""
    module = types.ModuleType(name)
    module.__path__ = [str(src / name)]
    sys.modules[name] = module


def _mindspeed_llm_parser(src: Path) -> argparse.ArgumentParser:
    sys.path.insert(0, str(src))
    ours = ("megatron", "mindspeed", "mindspeed_llm")
    for _ in range(50):
        _bare_package("mindspeed_llm", src)
        try:
            from megatron.training.arguments import add_megatron_arguments
            from mindspeed.features_manager.features_manager import MindSpeedFeaturesManager

            importlib.import_module("mindspeed_llm.features_manager")  # sets the features list
            break
        except ModuleNotFoundError as err:
            if err.name is None or err.name.split(".")[0] in ours:
                raise
            for name in [m for m in sys.modules if m.split(".")[0] in ours]:
                del sys.modules[name]
            sys.modules[err.name] = mock.MagicMock(name=err.name)
    # Megatron-LM's parse_args, with MindSpeed-LLM's extra_args_provider (process_args_v2).
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_megatron_arguments(parser)
    MindSpeedFeaturesManager.register_features_args(parser)
    return parser


def _flag_line(flag: str, action: argparse.Action) -> str:
    if action.nargs == 0:
        return f"{flag} {SWITCH}"
    kind = VALUES if action.nargs in ("*", "+") or isinstance(action.nargs, int) else VALUE
    choices = f" {'|'.join(map(str, action.choices))}" if action.choices else ""
    return f"{flag} {kind}{choices}"


def _commit(repo: Path, tag: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "rev-parse", f"{tag}^{{commit}}"], check=True, capture_output=True, text=True
    ).stdout.strip()


def generate(repos: dict[str, Path], tags: dict[str, str], out: Path = FLAGS_FILE) -> int:
    """Build the parser from the three tagged sources and write the flags file; the flag count."""
    header = [
        "# Flags of MindSpeed-LLM's pretrain_gpt.py argument parser (generated; do not edit).",
        "# source: Megatron-LM megatron/training/arguments.py add_megatron_arguments, then",
        "#   MindSpeedFeaturesManager.register_features_args over mindspeed_llm.features_manager's features",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        header += _export_sources(repos, tags, Path(tmp))
        parser = _mindspeed_llm_parser(Path(tmp))
    rows = [_flag_line(f, a) for f, a in sorted(parser._option_string_actions.items()) if f.startswith("--")]
    header += [
        "# regenerate: python -m qwen_pretrain.launch.mindspeed_llm_flags --mindspeed-llm DIR --mindspeed DIR --megatron-lm DIR",
        "# format: flag, then 'switch' (no value), 'value' (one) or 'values' (a list), then choices if any",
    ]
    atomic_write_text(out, "\n".join(header + rows) + "\n")
    return len(rows)


def _export_sources(repos: dict[str, Path], tags: dict[str, str], dest: Path) -> list[str]:
    """`git archive` each source's folder at its tag into `dest`; the header lines naming them."""
    header = []
    for key, folder, _ in SOURCES:
        archive = subprocess.run(
            ["git", "-C", str(repos[key]), "archive", tags[key], folder], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        header += [f"# {key} tag: {tags[key]}", f"# {key} commit: {_commit(repos[key], tags[key])}"]
    return header


def validate_rendered(repos: dict[str, Path], tags: dict[str, str], tokenizer_dir: str) -> list[str]:
    """MindSpeed-LLM's own validation of the rendered arguments: one line per case."""
    from qwen_pretrain.launch.render_megatron import DataSpec
    from qwen_pretrain.launch.render_mindspeed import MindSpeedRun, mindspeed_args
    from qwen_pretrain.recipes import all_recipes, get_recipe, override

    cases = [(r.name, r) for r in all_recipes() if r.acceptance]
    flow = override(get_recipe("qwen3_1p7b"), tp=8, pp=1, seq_length=4096, train_steps=2000)
    cases.append(("qwen3_1p7b TP8", flow))
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        _export_sources(repos, tags, Path(tmp))
        parser = _mindspeed_llm_parser(Path(tmp))
        from megatron.training import arguments as megatron_arguments

        validate = importlib.import_module("mindspeed_llm.training.arguments").validate_args_v2_decorator(
            megatron_arguments.validate_args)
        if isinstance(sys.modules.get("torch_npu"), mock.MagicMock):
            sys.modules["torch_npu"].__file__ = "/nonexistent/torch_npu/__init__.py"  # read by op builders
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"  # as the rendered script exports it
        # The device query of the grouped-GEMM check: on NPUs torch_npu answers it for torch.cuda.
        import torch

        torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
        for name, recipe in cases:
            data = DataSpec(blend=((1.0, "/data/corpus_text_document"),), split=recipe.data.split)
            argv = mindspeed_args(recipe, data, MindSpeedRun(tokenizer_dir))
            os.environ["WORLD_SIZE"], os.environ["RANK"] = str(recipe.gpus), "0"
            for _ in range(20):  # stub the Ascend runtime modules the checks import, then retry
                args = parser.parse_args(argv)
                args.rank, args.world_size = 0, recipe.gpus
                try:
                    with contextlib.redirect_stdout(io.StringIO()):  # its own print of every argument
                        validate(args, {})
                    lines.append(f"{name}: accepted at {recipe.gpus} NPUs (TP{args.tensor_model_parallel_size} "
                                 f"PP{args.pipeline_model_parallel_size} DP{args.data_parallel_size}, "
                                 f"padded vocabulary {args.padded_vocab_size})")
                    break
                except ModuleNotFoundError as err:
                    sys.modules[str(err.name)] = mock.MagicMock(name=err.name)
                except (AssertionError, ValueError, RuntimeError) as err:
                    lines.append(f"{name}: refused: {err}")
                    break
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key, _, tag in SOURCES:
        p.add_argument(f"--{key}", required=True, type=Path, help=f"a git clone of {key}")
        p.add_argument(f"--{key}-tag", default=tag, help=f"default: {tag}")
    p.add_argument("--out", type=Path, default=FLAGS_FILE)
    p.add_argument("--validate", action="store_true", help="run MindSpeed-LLM's validation on rendered arguments")
    p.add_argument("--tokenizer-dir", help="with --validate: a Hugging Face tokenizer directory (it must exist)")
    args = p.parse_args(argv)
    repos = {key: getattr(args, key.replace("-", "_")) for key, _, _ in SOURCES}
    tags = {key: getattr(args, key.replace("-", "_") + "_tag") for key, _, _ in SOURCES}
    if args.validate:
        if not args.tokenizer_dir:
            p.error("--validate needs --tokenizer-dir")
        lines = validate_rendered(repos, tags, str(Path(args.tokenizer_dir).resolve()))
        print("\n".join(lines))
        return 0 if all(": accepted" in line for line in lines) else 1
    n = generate(repos, tags, args.out)
    print(f"wrote {n} flags of MindSpeed-LLM {tags['mindspeed-llm']} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
