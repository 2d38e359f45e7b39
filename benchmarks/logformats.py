"""What each training-log format looks like: its step-line keys as data, and how to tell them apart.

Formats (see REFERENCE.md section 4):
  nemo       NeMo 2: `Training epoch 0, iteration 528/999 | lr: ... | global_step: 528 | ...`
  ours       our trainer: the NeMo 2 line plus `tflops_per_gpu`/`mfu`, or after OURS_LOG_MARKER
  megatron   Megatron-LM: ` [date] iteration  528/  999 | consumed samples: ... | lm loss: ...`
  bridge     Megatron-Bridge: the Megatron-LM line; recognised by `megatron.bridge` in the log
  mindspeed  MindSpeed-LLM / ModelLink: the Megatron-LM line, often with `gloabl batch size`
  nanotron   nanotron: `iteration: 528 / 999 | ... | tokens_per_sec_per_gpu: 6.71K | lm_loss: 3.06`

A family is one key table shared by formats that print the same line (Megatron-LM, Bridge and
MindSpeed; NeMo and ours); the format name only says where the log came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

FORMATS: tuple[str, ...] = ("nemo", "megatron", "bridge", "mindspeed", "nanotron", "ours")

# Our trainer prints the NeMo 2 step line (training/train_log.py). `--format auto` reports "ours"
# when a line before the first step contains this marker, or when the step line carries the
# fields our trainer appends after NeMo's (`tflops_per_gpu`, `mfu`), which NeMo never prints.
OURS_LOG_MARKER = "qwen-pretrain-trainer"

# A number as the logs print it: 3.06, 6.706e+03, 1.754000E-04, 3.1e+4, 12.9K, nan, -inf.
NUMBER = rb"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?[KMBGT]?(?![\w.])|(?i:[-+]?nan|[-+]?inf)"
SUFFIX_SCALE = {ord("K"): 1e3, ord("M"): 1e6, ord("B"): 1e9, ord("G"): 1e9, ord("T"): 1e12}


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One training step as a log printed it; None where the line had no such field."""

    step: int
    line_no: int
    loss: float | None = None
    step_time_s: float | None = None
    tokens_per_sec_per_gpu: float | None = None
    tflops_per_gpu: float | None = None
    global_batch_size: int | None = None
    seq_length: int | None = None
    lr: float | None = None
    val_loss: float | None = None


# StepRecord's value fields, in order: the internal records are lists in this order.
VALUE_FIELDS: tuple[str, ...] = (
    "loss", "step_time_s", "tokens_per_sec_per_gpu", "tflops_per_gpu",
    "global_batch_size", "seq_length", "lr", "val_loss",
)
STEP_COLUMN = len(VALUE_FIELDS)  # a record's step rides in one slot past its values
INT_FIELDS = frozenset({"global_batch_size", "seq_length"})


@dataclass(frozen=True)
class LineFamily:
    """How one family of step lines names its fields: log key -> (StepRecord field, scale)."""

    name: str
    keys: dict[str, tuple[str, float]]
    # b"key" -> column in VALUE_FIELDS or STEP_COLUMN; (column, scale) where scale != 1.
    column_of: dict[bytes, int] = field(init=False, repr=False, compare=False)
    scaled: tuple[tuple[int, float], ...] = field(init=False, repr=False, compare=False)
    # `| key: value` for this family's keys only: a key counts only right after a `|`, so
    # `lm loss` never matches inside another field's name. One C-level findall per record.
    pattern: re.Pattern[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        column_of = {
            key.encode(): STEP_COLUMN if name == "step" else VALUE_FIELDS.index(name)
            for key, (name, _) in self.keys.items()
        }
        scaled = tuple(sorted({(column_of[key.encode()], scale) for key, (_, scale) in self.keys.items() if scale != 1.0}))
        alternation = b"|".join(re.escape(k) for k in sorted(column_of, key=len, reverse=True))
        pattern = re.compile(rb"\|[ \t]*(" + alternation + rb")[ \t]*:([^|]*)")
        object.__setattr__(self, "column_of", column_of)
        object.__setattr__(self, "scaled", scaled)
        object.__setattr__(self, "pattern", pattern)


NEMO_FAMILY = LineFamily(
    "nemo",
    {
        "global_step": ("step", 1.0),
        "reduced_train_loss": ("loss", 1.0),
        "train_step_timing in s": ("step_time_s", 1.0),
        "tokens_per_sec_per_gpu": ("tokens_per_sec_per_gpu", 1.0),
        "global_batch_size": ("global_batch_size", 1.0),
        "lr": ("lr", 1.0),
        "val_loss": ("val_loss", 1.0),
        "tflops_per_gpu": ("tflops_per_gpu", 1.0),  # ours only (after NeMo's fields)
    },
)
MEGATRON_FAMILY = LineFamily(
    "megatron",
    {
        "elapsed time per iteration (ms)": ("step_time_s", 1e-3),
        "throughput per GPU (TFLOP/s/GPU)": ("tflops_per_gpu", 1.0),
        "learning rate": ("lr", 1.0),
        "global batch size": ("global_batch_size", 1.0),
        "gloabl batch size": ("global_batch_size", 1.0),  # MindSpeed/ModelLink's old misspelling
        "lm loss": ("loss", 1.0),
        "actual seqlen": ("seq_length", 1.0),  # MindSpeed/ModelLink
        "TFLOPs": ("tflops_per_gpu", 1.0),  # MindSpeed/ModelLink: per device
    },
)
NANOTRON_FAMILY = LineFamily(
    "nanotron",
    {
        "elapsed_time_per_iteration_ms": ("step_time_s", 1e-3),
        "tokens_per_sec_per_gpu": ("tokens_per_sec_per_gpu", 1.0),
        "global_batch_size": ("global_batch_size", 1.0),
        "lm_loss": ("loss", 1.0),
        "lr": ("lr", 1.0),
        "model_tflops_per_gpu": ("tflops_per_gpu", 1.0),
    },
)
FAMILY_OF_FORMAT = {
    "nemo": NEMO_FAMILY,
    "ours": NEMO_FAMILY,
    "megatron": MEGATRON_FAMILY,
    "bridge": MEGATRON_FAMILY,
    "mindspeed": MEGATRON_FAMILY,
    "nanotron": NANOTRON_FAMILY,
}
LEADING_NUMBER = re.compile(rb"\s*(" + NUMBER + rb")")


def parse_number(raw: bytes) -> float | None:
    """A field value as the logs print it: `6.706e+03` -> 6706.0, ` 12.9K ` -> 12900.0, `nan` -> nan,
    `3.624[rank0]: ...` (a glued record) -> 3.624; None when it does not start with a number."""
    try:
        return float(raw)  # the common case; float() ignores surrounding whitespace
    except ValueError:
        pass
    m = LEADING_NUMBER.match(raw)
    if m is None:
        return None
    token = m.group(1)
    scale = SUFFIX_SCALE.get(token[-1])
    return float(token[:-1]) * scale if scale is not None else float(token)


def family_of_record(segment: bytes, nanotron_colon: bool) -> LineFamily | None:
    """Which family a record belongs to, from the keys it carries (None: not a step line)."""
    if b"reduced_train_loss" in segment or b"global_step" in segment or b"train_step_timing" in segment:
        return NEMO_FAMILY
    if nanotron_colon or b"_per_iteration_ms" in segment:
        return NANOTRON_FAMILY
    if b"elapsed time per iteration" in segment or b"lm loss" in segment:
        return MEGATRON_FAMILY
    return None
