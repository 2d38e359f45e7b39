"""A recipe as MindSpeed-LLM `pretrain_gpt.py` arguments, and the bash script every Ascend NPU rank runs.

MindSpeed-LLM (Ascend/MindSpeed-LLM) is Megatron-LM patched for Ascend NPUs; release 2.3.0 runs
on Megatron-LM core_v0.12.1. Its `pretrain_gpt.py` takes Megatron-LM's flags plus its own. From
the recipe, the way MindSpeed-LLM's own Qwen scripts set them (`tests/0day/qwen3/`,
`examples/mcore/qwen3*/`, `examples/mcore/qwen25/` at 2.3.0):

- the model shape, parallel layout, batch, sequence length, seed, schedule and data exactly as
  the Megatron-LM renderer sets them (`megatron_lm_args`), vocabulary padding included;
- `--use-mcore-models`, and for Qwen3 and Qwen3-MoE `--spec mindspeed_llm.tasks.models.spec.qwen3_spec
  layer_spec` (local layers with q/k RMSNorm); Qwen2/2.5 run the default spec, as its scripts do;
- `--norm-topk-prob` for a MoE that renormalizes its top-k router probabilities (Qwen3-MoE);
- the tokenizer as `--tokenizer-type PretrainedFromHF --tokenizer-name-or-path DIR`;
- the NPU fused kernels (`--use-flash-attn --use-fused-rmsnorm --use-fused-swiglu
  --use-fused-rotary-pos-emb`) and the fusions its scripts turn off;
- `--load DIR --no-load-optim --no-load-rng` only when asked (weights converted with
  `convert hf-to-mcore --target mindspeed`), `--save DIR` only when asked.

Every flag is checked against MindSpeed-LLM's own parser at a pinned release
(`mindspeed_llm_flags.txt`, see `mindspeed_llm_flags.py`). The script holds the arguments in a
bash array, one flag per line: a line can be removed or commented out without ending the command
early (in a `\\`-continued command, a commented-out `--load` line runs the rest as a new command).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from qwen_pretrain.launch.render_megatron import DataSpec, megatron_lm_args
from qwen_pretrain.recipes import Recipe

# Where MindSpeed-LLM's checkout (pretrain_gpt.py with its mindspeed_llm/ and megatron/) lives.
DEFAULT_MINDSPEED_LLM_DIR = "/opt/MindSpeed-LLM"
# The CANN toolkit's environment script, where MindSpeed-LLM's install guide puts it.
DEFAULT_CANN_SET_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"
QWEN3_SPEC = ("mindspeed_llm.tasks.models.spec.qwen3_spec", "layer_spec")
# The model families whose MindSpeed-LLM scripts pass a layer spec (the others run its default).
SPECS = {"qwen3": QWEN3_SPEC, "qwen3_moe": QWEN3_SPEC}

# The Ascend environment of every rank, as MindSpeed-LLM's Qwen3 scripts export it. The values
# a site may tune keep the site's own setting (`${NAME:-default}`).
ASCEND_ENVIRONMENT = (
    ("HCCL_CONNECT_TIMEOUT", "${HCCL_CONNECT_TIMEOUT:-1800}"),  # seconds for HCCL links to come up
    ("CUDA_DEVICE_MAX_CONNECTIONS", "1"),  # in-order kernels for TP/SP overlap (torch_npu reads it too)
    ("PYTORCH_NPU_ALLOC_CONF", "${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}"),  # less fragmentation
    ("NPU_ASD_ENABLE", "0"),  # silent-data-corruption detection off, as in the scripts
)

# Megatron-LM tokenizer flags replaced by MindSpeed-LLM's Hugging Face tokenizer.
_MEGATRON_TOKENIZER_FLAGS = ("--tokenizer-type", "--tokenizer-model", "--vocab-size")


@dataclass(frozen=True)
class MindSpeedRun:
    """What a MindSpeed-LLM run needs beyond the recipe and the data."""

    tokenizer_dir: str
    load: str | None = None  # converted weights to start from
    save: str | None = None  # where to save (at the end of the run)
    mindspeed_llm_dir: str = DEFAULT_MINDSPEED_LLM_DIR
    cann_set_env: str = DEFAULT_CANN_SET_ENV
    python: str = "python"


def _drop(args: list[str], flags: tuple[str, ...]) -> list[str]:
    """`args` without the given flags and their values."""
    out: list[str] = []
    skipping = False
    for tok in args:
        if tok.startswith("--"):
            skipping = tok in flags
        if not skipping:
            out.append(tok)
    return out


def mindspeed_args(recipe: Recipe, data: DataSpec, run: MindSpeedRun) -> list[str]:
    """The argument list of MindSpeed-LLM's `pretrain_gpt.py` for this recipe (without the script)."""
    m, t = recipe.model, recipe.training
    a = ["--use-mcore-models"]
    spec = SPECS.get(m.family)
    if spec:
        a += ["--spec", *spec]
    a += _drop(megatron_lm_args(recipe, data), _MEGATRON_TOKENIZER_FLAGS)
    if m.is_moe and m.moe_norm_topk_prob:
        a.append("--norm-topk-prob")
    a += ["--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path", run.tokenizer_dir]
    a += [
        # NPU kernels: flash attention, RMSNorm, SwiGLU and RoPE
        "--use-flash-attn", "--use-fused-rmsnorm", "--use-fused-swiglu", "--use-fused-rotary-pos-emb",
        # Off in MindSpeed-LLM's scripts: the masked-softmax kernel (flash attention replaces it)
        # and the wgrad-accumulation fusion (a CUDA kernel of apex/Transformer Engine).
        "--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion",
    ]
    if run.load:
        # Converted weights start a new run: no optimizer or RNG state to restore.
        a += ["--load", run.load, "--no-load-optim", "--no-load-rng"]
    if run.save:
        a += ["--save", run.save, "--save-interval", str(t.train_steps)]
    # The flag checker imports the generator's machinery (unittest.mock, ...): load it only when
    # rendering, not at every command's start-up.
    from qwen_pretrain.launch.mindspeed_llm_flags import flag_problems

    problems = flag_problems(a)
    if problems:
        raise RuntimeError("internal: MindSpeed-LLM arguments disagree with its parser: " + "; ".join(problems))
    return a


def _arg_lines(args: list[str]) -> list[str]:
    """One line per flag with its values, shell-quoted."""
    lines: list[list[str]] = []
    for tok in args:
        if tok.startswith("--") or not lines:
            lines.append([])
        lines[-1].append(shlex.quote(tok))
    return [" ".join(words) for words in lines]


def render_mindspeed_script(recipe: Recipe, data: DataSpec, run: MindSpeedRun, comments: list[str]) -> str:
    """The bash script every rank runs: Ascend environment, the arguments, `pretrain_gpt.py`."""
    lines = [
        "#!/bin/bash",
        f"# MindSpeed-LLM pretrain_gpt.py for recipe '{recipe.name}', one rank (rendered by qwen-pretrain).",
        *comments,
        "# torchrun starts it as every rank: torchrun --nproc-per-node NPUS ... --no-python THIS_SCRIPT",
        "# Arguments given to the script are appended to pretrain_gpt.py's.",
        "# No `set -u`: CANN's set_env.sh reads variables that may be unset.",
        "set -eo pipefail",
        "",
        f"source {shlex.quote(run.cann_set_env)}",
        *(f"export {name}={value}" for name, value in ASCEND_ENVIRONMENT),
        "",
        "# One flag per line in a bash array: a line can be removed or commented out safely.",
        "ARGS=(",
        *(f"    {line}" for line in _arg_lines(mindspeed_args(recipe, data, run))),
        ")",
        "",
        "# pretrain_gpt.py imports mindspeed_llm and megatron from its checkout.",
        f"cd {shlex.quote(run.mindspeed_llm_dir)}",
        f'exec {shlex.quote(run.python)} pretrain_gpt.py "${{ARGS[@]}}" "$@"',
    ]
    return "\n".join(lines) + "\n"
