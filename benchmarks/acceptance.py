"""Verdicts: a run against a baseline (`bench accept`) and two runs side by side (`bench compare`).

Accuracy: the loss at the final step must be within `loss_tol` (relative, default 5%) of the
baseline's. Performance (optional): the mean tokens/s/GPU of the averaging window must be at
least `perf_baseline x (1 - perf_tol)`; faster than the baseline always passes.
Exit codes: 0 passed, 1 failed, 2 unusable (no final step, NaN loss, too short, nothing to compare).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from qwen_pretrain.benchmarks.runs import RunResult, parse_run, steps_done
from qwen_pretrain.recipes.errors import UserError

EXIT_CODES = {"passed": 0, "failed": 1, "unusable": 2}


@dataclass(frozen=True)
class Baseline:
    """What a run is judged against; any figure may be missing."""

    source: str
    final_loss: float | None = None
    final_step: int | None = None
    tokens_per_sec_per_gpu_mean: float | None = None
    format: str | None = None  # to line steps up across frameworks (see runs.steps_done)


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    baseline: float | None
    rel_diff: float | None  # (value - baseline) / |baseline|
    tolerance: str
    status: str  # PASS / FAIL / UNUSABLE
    note: str = ""


@dataclass(frozen=True)
class Verdict:
    status: str  # passed / failed / unusable
    reason: str
    checks: tuple[Check, ...]

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value


def _baseline_from_json(path: Path) -> Baseline:
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    try:
        if text.startswith("{") and "\n{" in text:  # `bench parse --json` of several logs
            objs = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            obj = json.loads(text)
            objs = obj["runs"] if isinstance(obj, dict) and "runs" in obj else [obj]
    except (json.JSONDecodeError, TypeError) as err:
        raise UserError(f"{path}: not valid JSON ({err}): pass a `bench parse --json` output, "
                        "a report summary.json, a log or a number") from err
    if len(objs) != 1 or not isinstance(objs[0], dict):
        raise UserError(f"{path}: holds {len(objs)} runs: pass a JSON file with exactly one run as --baseline")
    obj = objs[0]
    if obj.get("final_loss") is None and obj.get("tokens_per_sec_per_gpu_mean") is None:
        raise UserError(f"{path}: has neither final_loss nor tokens_per_sec_per_gpu_mean")
    return Baseline(str(path), obj.get("final_loss"), obj.get("final_step"), obj.get("tokens_per_sec_per_gpu_mean"),
                    obj.get("format"))


def load_baseline(spec: str, **parse_kwargs) -> Baseline:
    """`--baseline LOG|JSON|NUMBER`: a number is the baseline's final loss."""
    value = _number(spec)
    if value is not None and not Path(spec).exists():
        return Baseline(f"number {spec}", final_loss=value)
    path = Path(spec)
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"--baseline {spec}: no such file")
        return _baseline_from_json(path)
    run = parse_run(path, **parse_kwargs)
    if not run.usable:
        raise UserError(f"--baseline {spec}: unusable baseline log: {run.reason}", exit_code=2)
    return Baseline(str(path), run.final_loss, run.final_step, run.tokens_per_sec_per_gpu_mean, run.format)


def _rel(value: float, base: float) -> float:
    return (value - base) / abs(base)


def accept(run: RunResult, baseline: Baseline, loss_tol: float = 0.05,
           perf_baseline: float | None = None, perf_tol: float = 0.05) -> Verdict:
    """Judge `run`: final loss within `loss_tol` of the baseline; optionally the throughput."""
    if loss_tol < 0 or perf_tol < 0:
        raise UserError("--loss-tol and --perf-tol must be >= 0 (fractions: 0.05 is 5%)")
    checks: list[Check] = []
    problems: list[str] = []

    base_loss = baseline.final_loss
    loss_tolerance = f"+-{loss_tol:.2%}"
    if not run.usable:
        problems.append(run.reason)
        checks.append(Check("final loss", run.final_loss, base_loss, None, loss_tolerance, "UNUSABLE", run.reason))
    elif base_loss is None or not math.isfinite(base_loss) or base_loss == 0:
        note = f"baseline {baseline.source} has no usable final loss ({base_loss})"
        problems.append(note)
        checks.append(Check("final loss", run.final_loss, base_loss, None, loss_tolerance, "UNUSABLE", note))
    elif baseline.final_step is not None and (
            steps_done(baseline.format or run.format, baseline.final_step) != steps_done(run.format, run.final_step)):
        note = (f"run ends at step {run.final_step} ({run.format}), the baseline at step {baseline.final_step}"
                f"{f' ({baseline.format})' if baseline.format else ''}")
        problems.append(note)
        checks.append(Check("final loss", run.final_loss, base_loss, None, loss_tolerance, "UNUSABLE", note))
    else:
        rel = _rel(run.final_loss, base_loss)
        ok = abs(rel) <= loss_tol
        checks.append(Check(f"final loss (step {run.final_step})", run.final_loss, base_loss, rel,
                            loss_tolerance, "PASS" if ok else "FAIL"))

    if perf_baseline is not None:
        tol = f">= -{perf_tol:.2%}"
        mean = run.tokens_per_sec_per_gpu_mean
        name = "tokens/s/GPU mean" + (" (derived)" if run.tokens_per_sec_per_gpu_derived else "")
        if mean is None or not math.isfinite(perf_baseline) or perf_baseline <= 0:
            if mean is None:
                note = run.reason if not run.usable else "the run has no tokens/s/GPU mean (see its warnings)"
            else:
                note = f"--perf-baseline {perf_baseline} is not a positive number"
            problems.append(note)
            checks.append(Check(name, mean, perf_baseline, None, tol, "UNUSABLE", note))
        else:
            rel = _rel(mean, perf_baseline)
            checks.append(Check(name, mean, perf_baseline, rel, tol, "PASS" if rel >= -perf_tol else "FAIL"))

    if problems:
        return Verdict("unusable", "; ".join(dict.fromkeys(problems)), tuple(checks))
    failed = [c.name for c in checks if c.status == "FAIL"]
    if failed:
        return Verdict("failed", "outside tolerance: " + ", ".join(failed), tuple(checks))
    return Verdict("passed", "", tuple(checks))


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.1f}"


def verdict_table(verdict: Verdict) -> str:
    rows = [("check", "value", "baseline", "diff", "tolerance", "result")]
    for c in verdict.checks:
        diff = "-" if c.rel_diff is None else f"{c.rel_diff:+.2%}"
        rows.append((c.name, _fmt(c.value), _fmt(c.baseline), diff, c.tolerance, c.status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    overall = {"passed": "PASS", "failed": "FAIL", "unusable": "UNUSABLE"}[verdict.status]
    lines.append(f"overall: {overall}" + (f" ({verdict.reason})" if verdict.reason else ""))
    return "\n".join(lines)


@dataclass(frozen=True)
class Comparison:
    common_steps: int
    loss_correlation: float | None
    max_rel_loss_diff: float | None  # |a - b| / |b| at the worst common step
    max_rel_loss_diff_step: int | None
    final_loss_rel_diff: float | None
    tokens_per_sec_ratio: float | None  # a / b


def compare_runs(a: RunResult, b: RunResult) -> Comparison:
    """Loss curves of two runs on their common steps: Pearson correlation, worst relative gap."""
    if a.table is None or b.table is None:
        raise UserError("compare needs parsed logs, not JSON summaries")
    # Steps lined up as steps completed (NeMo counts from 0, Megatron-LM from 1); reported in A's numbering.
    shift = steps_done(b.format, 0) - steps_done(a.format, 0)
    la = dict(zip(a.table.steps, a.table.column("loss")))
    pairs = [(s + shift, la[s + shift], lb) for s, lb in zip(b.table.steps, b.table.column("loss"))
             if s + shift in la and math.isfinite(la[s + shift]) and math.isfinite(lb)]
    corr = worst = worst_step = None
    if len(pairs) >= 2:
        xs = [p[1] for p in pairs]
        ys = [p[2] for p in pairs]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
        sxx = sum((x - mx) ** 2 for x in xs)
        syy = sum((y - my) ** 2 for y in ys)
        corr = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None
    for s, x, y in pairs:
        if y != 0:
            rel = abs(x - y) / abs(y)
            if worst is None or rel > worst:
                worst, worst_step = rel, s
    final = None
    if a.final_loss is not None and b.final_loss and math.isfinite(a.final_loss) and math.isfinite(b.final_loss):
        final = _rel(a.final_loss, b.final_loss)
    ratio = None
    if a.tokens_per_sec_per_gpu_mean and b.tokens_per_sec_per_gpu_mean:
        ratio = a.tokens_per_sec_per_gpu_mean / b.tokens_per_sec_per_gpu_mean
    return Comparison(len(pairs), corr, worst, worst_step, final, ratio)
