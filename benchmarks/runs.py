"""A parsed run: the per-step table (last occurrence wins), the averaging rule and RunResult.

Memory: the table keeps only numbers per UNIQUE step (about 50 bytes each in `array`s), so a
log grows in memory with the steps it holds, never with its size in bytes (noise, progress
bars, ranks repeating lines and restarts cost nothing).
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from qwen_pretrain.benchmarks.logparse import (
    NEMO_FAMILY,
    VALUE_FIELDS,
    Batch,
    iter_raw_records,
)
from qwen_pretrain.benchmarks.rule import DEFAULT_SKIP_FIRST, DEFAULT_SKIP_LAST, averaging_window  # noqa: F401
from qwen_pretrain.recipes.errors import UserError


def steps_done(fmt: str, step: int) -> int:
    """Training steps completed when a format prints `step`: NeMo's global_step (and ours) counts
    from 0, Megatron-LM's and nanotron's iteration from 1. Used to line runs of different
    frameworks up: NeMo step 999 and Megatron-LM iteration 1000 both end a 1000-step run."""
    return step + 1 if fmt in ("nemo", "ours") else step


class StepTable:
    """Per-step values sorted by step; a step seen again replaces the earlier values.

    Row-major in one `array("d")` (NaN = absent): appending a step is a single C call.
    """

    COLUMNS = VALUE_FIELDS

    def __init__(self) -> None:
        self.steps = array("q")
        self.data = array("d")
        self.repeated = 0  # occurrences replaced by a later one
        self.line_of_first_repeat: int | None = None

    def __len__(self) -> int:
        return len(self.steps)

    def put(self, step: int, line_no: int, row: list[float]) -> None:
        """Add a step's values (VALUE_FIELDS order, NaN = absent); a known step is replaced."""
        steps = self.steps
        if not steps or step > steps[-1]:
            steps.append(step)
            self.data.extend(row)
            return
        width = len(self.COLUMNS)
        i = bisect_left(steps, step)
        if i < len(steps) and steps[i] == step:
            self.repeated += 1
            if self.line_of_first_repeat is None:
                self.line_of_first_repeat = line_no
            self.data[i * width:(i + 1) * width] = array("d", row)
        else:  # an earlier step printed late (rare): keep the table sorted
            steps.insert(i, step)
            self.data[i * width:i * width] = array("d", row)

    def add_batch(self, batch: Batch) -> None:
        """A block's records; steps that only go up (the usual case) are appended in one go."""
        steps = batch.steps
        if not len(steps):
            return
        if (not self.steps or steps[0] > self.steps[-1]) and bool(np.all(steps[1:] > steps[:-1])):
            self.steps.frombytes(steps.astype(np.int64).tobytes())
            self.data.frombytes(np.ascontiguousarray(batch.values, np.float64).tobytes())
            return
        for step, line_no, row in batch.records():
            self.put(step, line_no, row)

    def column(self, name: str) -> np.ndarray:
        """A copy of one column as float64 (NaN = absent)."""
        rows = np.frombuffer(self.data, dtype=np.float64).reshape(-1, len(self.COLUMNS))
        return rows[:, self.COLUMNS.index(name)].copy()

    def set_column(self, name: str, values: np.ndarray) -> None:
        self.data[self.COLUMNS.index(name)::len(self.COLUMNS)] = array("d", values.tobytes())


@dataclass(frozen=True)
class Derivation:
    """What the user passed to derive tokens/s/GPU for logs without it (Megatron-style)."""

    seq_length: int | None = None
    global_batch_size: int | None = None
    gpus: int | None = None


@dataclass(frozen=True)
class RunResult:
    """A log reduced to the figures the acceptance rule needs. status: "ok" or "unusable"."""

    path: str
    format: str
    status: str
    reason: str
    steps: int
    first_step: int | None
    last_step: int | None
    steps_used: int
    window_first_step: int | None
    window_last_step: int | None
    skip_first: int
    skip_last: int
    tokens_per_sec_per_gpu_mean: float | None
    tokens_per_sec_per_gpu_derived: bool
    step_time_mean_s: float | None
    tflops_per_gpu_mean: float | None
    final_step: int | None
    final_loss: float | None
    seq_length: int | None
    global_batch_size: int | None
    gpus: int | None
    warnings: tuple[str, ...]
    table: StepTable | None = field(default=None, repr=False, compare=False)

    @property
    def usable(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict:
        """JSON-ready dict (NaN and inf become null; the reason says why)."""
        out = {}
        for name in self.__dataclass_fields__:
            if name == "table":
                continue
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


def _mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def check_log_path(path: str | Path) -> Path:
    """A readable regular file, or a UserError (exit 2) that says what to pass instead."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file: pass the path of a training log")
    if p.is_dir():
        logs = sorted(str(x.name) for x in p.iterdir() if x.suffix in (".log", ".txt", ".out"))[:3]
        hint = f" (e.g. {', '.join(logs)})" if logs else ""
        raise UserError(f"{p}: is a directory: pass a log file inside it{hint}")
    if not p.is_file():
        raise UserError(f"{p}: not a regular file: pass a training log file")
    return p


def parse_run(
    path: str | Path,
    fmt: str = "auto",
    skip_first: int = DEFAULT_SKIP_FIRST,
    skip_last: int = DEFAULT_SKIP_LAST,
    allow_short: bool = False,
    derivation: Derivation = Derivation(),
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Parse one log and apply the acceptance rule. Bad paths raise UserError; a log that parses
    but cannot be judged comes back with status "unusable" and the reason."""
    p = check_log_path(path)
    scan, records = iter_raw_records(p, fmt, progress)
    table = StepTable()
    for batch in records:
        table.add_batch(batch)
    warnings: list[str] = []
    fmt_name = scan.format

    def result(status: str, reason: str, **kw) -> RunResult:
        base = dict(
            path=str(p), format=fmt_name, status=status, reason=reason, steps=len(table),
            first_step=table.steps[0] if len(table) else None,
            last_step=table.steps[-1] if len(table) else None,
            steps_used=0, window_first_step=None, window_last_step=None,
            skip_first=skip_first, skip_last=skip_last,
            tokens_per_sec_per_gpu_mean=None, tokens_per_sec_per_gpu_derived=False,
            step_time_mean_s=None, tflops_per_gpu_mean=None, final_step=None, final_loss=None,
            seq_length=None, global_batch_size=None, gpus=None,
            warnings=tuple(warnings), table=table,
        )
        base.update(kw)
        return RunResult(**base)

    if len(table) == 0:
        if scan.bytes_read == 0:
            reason = "the file is empty"
        elif scan.looks_binary:
            reason = "the file looks like binary data, not a training log"
        else:
            which = "" if fmt == "auto" else f" {fmt}"
            reason = (f"no{which} training step lines found in {scan.lines} lines "
                      "(expected e.g. `iteration N/M | ... | reduced_train_loss: ...`); "
                      "check the file, or pass --format")
        return result("unusable", reason)

    if table.repeated:
        warnings.append(f"{table.repeated} repeated step line(s) (restart or several ranks printing; "
                        f"first at line {table.line_of_first_repeat}): the last occurrence of each step is kept")
    if scan.dropped_long_lines:
        warnings.append(f"{scan.dropped_long_lines} line(s) over 1 MiB ignored (binary data?)")

    steps = table.steps
    loss = table.column("loss")
    # NaN in the table means "printed nan" or "not printed" (skipped step): both have no loss.
    nan_losses = int(np.isnan(loss).sum())
    if nan_losses:
        warnings.append(f"{nan_losses} step(s) with no loss or a NaN loss (skipped or NaN iterations)")

    final_step = steps[-1]
    final_loss = float(loss[-1])
    window = averaging_window(len(steps), skip_first, skip_last)
    short_reason = None
    if window is None:
        short_reason = (f"only {len(steps)} unique steps (steps {steps[0]}..{steps[-1]}); the rule drops the first "
                        f"{skip_first} and the last {skip_last}, so at least {skip_first + skip_last + 1} are needed "
                        "(pass --allow-short to average over all steps)")
        if allow_short:
            warnings.append("short run: " + short_reason.split(" (pass")[0] + "; averaging over all steps")
            window = slice(0, len(steps))

    tps, derived, used = _tokens_per_sec(table, scan, derivation, warnings)
    if derived:  # keep the derived per-step values in the table, for plots and reports
        table.set_column("tokens_per_sec_per_gpu", tps)
    step_time = table.column("step_time_s")
    tflops = table.column("tflops_per_gpu")
    kw = dict(final_step=final_step, final_loss=final_loss, tokens_per_sec_per_gpu_derived=derived, **used)
    if window is None:
        return result("unusable", short_reason, **kw)
    kw.update(
        steps_used=window.stop - window.start,
        window_first_step=steps[window.start], window_last_step=steps[window.stop - 1],
        tokens_per_sec_per_gpu_mean=_mean(tps[window]) if tps is not None else None,
        step_time_mean_s=_mean(step_time[window]),
        tflops_per_gpu_mean=_mean(tflops[window]),
    )
    if tps is not None:
        missing = int((~np.isfinite(tps[window])).sum())
        if missing:
            warnings.append(f"{missing} step(s) in the averaging window have no tokens/s value")
    if math.isnan(final_loss):
        return result("unusable", f"the final step {final_step} has no loss or a NaN loss", **kw)
    return result("ok", "", **kw)


def _tokens_per_sec(table: StepTable, scan, derivation: Derivation,
                    warnings: list[str]) -> tuple[np.ndarray | None, bool, dict]:
    """Per-step tokens/s/GPU: the log's own field, or derived as seq x global batch / step time / GPUs."""
    logged = table.column("tokens_per_sec_per_gpu")
    if np.isfinite(logged).any():
        return logged, False, {}
    # Values from the command line win; then the log (step line, or Megatron-LM's argument dump).
    log_seq = table.column("seq_length")
    log_seq = log_seq[np.isfinite(log_seq)]
    seq = derivation.seq_length or (int(log_seq[-1]) if log_seq.size else scan.hints.get("seq_length"))
    gpus = derivation.gpus or scan.hints.get("world_size")
    gbs = table.column("global_batch_size")
    gbs_default = derivation.global_batch_size or scan.hints.get("global_batch_size")
    if derivation.global_batch_size:
        gbs[:] = derivation.global_batch_size
    elif gbs_default:
        gbs[~np.isfinite(gbs)] = gbs_default
    missing = [flag for flag, v in (("--seq-length", seq), ("--gpus", gpus)) if not v]
    if not np.isfinite(gbs).any():
        missing.append("--global-batch-size")
    if missing:
        why = (" (NeMo prints it only with TimingCallback(log_tokens_per_sec=True))"
               if scan.family is NEMO_FAMILY else "")
        warnings.append(f"the log prints no tokens/s{why}: pass {', '.join(missing)} to derive "
                        "tokens/s/GPU = seq length x global batch / step time / GPUs")
        return None, False, {}
    sources = []
    if not derivation.seq_length:
        sources.append(f"seq length {seq}")
    if not derivation.gpus:
        sources.append(f"{gpus} GPUs")
    if sources:
        warnings.append(f"derived tokens/s uses {' and '.join(sources)} read from the log")
    step_time = table.column("step_time_s")
    with np.errstate(divide="ignore", invalid="ignore"):
        tps = np.where(step_time > 0, seq * gbs / step_time / gpus, np.nan)
    finite_gbs = gbs[np.isfinite(gbs)]
    return tps, True, {"seq_length": seq, "global_batch_size": int(finite_gbs[-1]), "gpus": gpus}
