"""Ours against the reference trainer: `bench accept`, the per-step loss gap and the throughput.

    judgement = judge_against_reference(ours_run_dir, reference_run_dir, ours_processes=2)
    print(judgement_text(judgement)); sys.exit(judgement.exit_code)

Three checks, one verdict with `bench accept`'s exit codes (0 passed, 1 failed, 2 unusable):

1. `bench accept` of our log with the reference log as the baseline: the final loss within 5%.
2. The largest per-step loss gap |ours - reference|, read at full precision from both runs'
   `metrics.jsonl` (the log prints 4 significant digits). From the same weights on the same
   batches, two correct fp32 trainers differ by rounding only: 5e-6 after 40 steps of the demo
   (docs/training.md). A peak learning rate 20% too high, or one skipped batch, gave gaps of 0.15
   and 0.17 in 21 steps while the final loss stayed within 2%: the tolerance is 1e-3 nats.
3. Throughput: tokens/s of the whole machine (tokens/s/GPU x processes) over the acceptance
   window, ours over the reference. The two runs take turns on the same cores, so the ratio is
   judged only against a floor that catches a pathologically slow trainer, not a few percent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_pretrain.benchmarks.acceptance import Baseline, Verdict, accept, verdict_table
from qwen_pretrain.benchmarks.reference_trainer import read_losses
from qwen_pretrain.benchmarks.runs import RunResult, parse_run

LOSS_TOLERANCE = 0.05
GAP_TOLERANCE = 1e-3
THROUGHPUT_FLOOR = 0.5
SEVERITY = {"passed": 0, "failed": 1, "unusable": 2}


@dataclass(frozen=True)
class RunFiles:
    """One trainer's outputs: its NeMo-format log and its metrics.jsonl."""

    log: Path
    metrics: Path
    processes: int  # the "GPUs" of its tokens/s/GPU


@dataclass(frozen=True)
class PartResult:
    status: str  # passed / failed / unusable
    text: str  # one line for the report


@dataclass(frozen=True)
class Judgement:
    ours: RunResult
    reference: RunResult
    accept: Verdict  # bench accept of ours against the reference log
    gap: float | None  # largest |ours - reference| over the steps both logged
    gap_step: int | None
    gap_steps: int  # steps compared
    gap_part: PartResult
    ours_tokens_per_s: float | None  # whole machine, acceptance window
    reference_tokens_per_s: float | None
    throughput_ratio: float | None
    throughput_part: PartResult

    @property
    def status(self) -> str:
        parts = (self.accept.status, self.gap_part.status, self.throughput_part.status)
        return max(parts, key=SEVERITY.__getitem__)

    @property
    def exit_code(self) -> int:
        return SEVERITY[self.status]


def baseline_of(run: RunResult) -> Baseline:
    """The reference run as `bench accept --baseline reference.log` reads it."""
    return Baseline(source=run.path, final_loss=run.final_loss, final_step=run.final_step,
                    tokens_per_sec_per_gpu_mean=run.tokens_per_sec_per_gpu_mean, format=run.format)


def loss_gap(ours: dict[int, float], reference: dict[int, float]) -> tuple[float | None, int | None, str]:
    """(largest |ours - reference|, its step, why it cannot be judged or "") over the steps of both."""
    if not ours or not reference:
        return None, None, "no training losses in " + ("our metrics.jsonl" if not ours else "the reference's metrics.jsonl")
    if set(ours) != set(reference):
        only = sorted(set(ours) ^ set(reference))
        return None, None, f"the runs logged different steps (e.g. step {only[0]} in one only)"
    worst, worst_step = 0.0, min(ours)
    for step in sorted(ours):
        gap = abs(ours[step] - reference[step])
        if not math.isfinite(gap):
            return None, step, f"a non-finite loss at step {step}"
        if gap > worst:
            worst, worst_step = gap, step
    return worst, worst_step, ""


def _gap_part(gap: float | None, step: int | None, steps: int, problem: str) -> PartResult:
    if gap is None:
        return PartResult("unusable", f"per-step loss gap: UNUSABLE ({problem})")
    ok = gap <= GAP_TOLERANCE
    return PartResult("passed" if ok else "failed",
                      f"per-step loss gap: largest |ours - reference| {gap:.2e} at step {step} over {steps} "
                      f"steps (tolerance {GAP_TOLERANCE:.0e}): {'PASS' if ok else 'FAIL'}")


def _throughput_part(ours: float | None, reference: float | None, ours_processes: int) -> tuple[float | None, PartResult]:
    if not ours or not reference:
        return None, PartResult("unusable", "throughput: UNUSABLE (a run has no tokens/s mean over the window)")
    ratio = ours / reference
    ok = ratio >= THROUGHPUT_FLOOR
    return ratio, PartResult(
        "passed" if ok else "failed",
        f"throughput (whole machine, acceptance window): ours {ours:,.0f} tokens/s ({ours_processes} processes), "
        f"reference {reference:,.0f} tokens/s (one process): ours/reference {ratio:.2f}x "
        f"(floor {THROUGHPUT_FLOOR:.2f}x): {'PASS' if ok else 'FAIL'}",
    )


def judge_against_reference(ours: RunFiles, reference: RunFiles) -> Judgement:
    """Parse both logs and judge ours against the reference (see the module docstring)."""
    ours_run, ref_run = parse_run(ours.log), parse_run(reference.log)
    verdict = accept(ours_run, baseline_of(ref_run), loss_tol=LOSS_TOLERANCE)
    if not ref_run.usable:  # `bench accept` refuses an unusable baseline log: unusable here too
        verdict = Verdict("unusable", f"reference log: {ref_run.reason}", verdict.checks)
    ours_losses = read_losses(ours.metrics) if ours.metrics.is_file() else {}
    ref_losses = read_losses(reference.metrics) if reference.metrics.is_file() else {}
    gap, gap_step, problem = loss_gap(ours_losses, ref_losses)
    steps = len(set(ours_losses) & set(ref_losses))
    ours_tps = _machine(ours_run, ours.processes)
    ref_tps = _machine(ref_run, reference.processes)
    ratio, throughput = _throughput_part(ours_tps, ref_tps, ours.processes)
    return Judgement(ours_run, ref_run, verdict, gap, gap_step, steps, _gap_part(gap, gap_step, steps, problem),
                     ours_tps, ref_tps, ratio, throughput)


def _machine(run: RunResult, processes: int) -> float | None:
    mean = run.tokens_per_sec_per_gpu_mean
    return None if mean is None else mean * processes


def judgement_text(j: Judgement, ours_label: str, reference_label: str) -> str:
    """The report: bench accept's table, then the gap and throughput lines, then the verdict."""
    overall = {"passed": "PASS", "failed": "FAIL", "unusable": "UNUSABLE"}[j.status]
    return "\n".join([
        f"bench accept {ours_label} --baseline {reference_label}:",
        verdict_table(j.accept),
        j.gap_part.text,
        j.throughput_part.text,
        f"verdict against the reference: {overall}",
    ])


def judgement_json(j: Judgement) -> dict[str, Any]:
    return {
        "verdict": j.status,
        "exit_code": j.exit_code,
        "accept": {"status": j.accept.status, "reason": j.accept.reason,
                   "checks": [c.__dict__ for c in j.accept.checks]},
        "per_step_gap": {"max_abs": j.gap, "step": j.gap_step, "steps": j.gap_steps, "tolerance": GAP_TOLERANCE,
                         "status": j.gap_part.status},
        "throughput": {"ours_tokens_per_s": j.ours_tokens_per_s, "reference_tokens_per_s": j.reference_tokens_per_s,
                       "ratio": j.throughput_ratio, "floor": THROUGHPUT_FLOOR, "status": j.throughput_part.status},
    }


def write_loss_plot(ours: dict[int, float], reference: dict[int, float], out: Path,
                    ours_label: str, reference_label: str) -> Path:
    """One PNG: both loss curves overlaid, and below them the per-step difference."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from qwen_pretrain.recipes.files import atomic_write_bytes

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), dpi=100, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    for losses, label, style in ((reference, reference_label, "-"), (ours, ours_label, "--")):
        steps = sorted(losses)
        top.plot(steps, [losses[s] for s in steps], style, lw=1.4, marker=".", label=label)
    top.set_title("Training loss per step: ours and the reference, same weights and batches")
    top.set_ylabel("loss")
    top.grid(True, alpha=0.3)
    top.legend(fontsize=8)
    common = sorted(set(ours) & set(reference))
    bottom.plot(common, [ours[s] - reference[s] for s in common], color="C3", lw=1.0, marker=".")
    bottom.axhline(0.0, color="k", lw=0.6)
    bottom.set_ylabel("ours - reference")
    bottom.set_xlabel("step")
    bottom.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out
