"""`bench report`: a Markdown and a JSON summary of one or more runs, MFU, and PNG plots.

MFU = tokens/s/GPU x training FLOPs per token / the GPU's dense BF16 peak, with the FLOPs per
token of `recipes.planner.flops_per_token` (Megatron-LM's accounting) for the recipe's model at
the run's sequence length. Every file is written atomically (temp file, then rename).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from qwen_pretrain.benchmarks.acceptance import Comparison
from qwen_pretrain.benchmarks.runs import RunResult
from qwen_pretrain.recipes.files import atomic_write_bytes


@dataclass(frozen=True)
class Mfu:
    recipe: str
    gpu: str
    seq_length: int
    seq_length_from: str  # "--seq-length", "the log" or "the recipe"
    flops_per_token: float
    peak_tflops: float
    model_tflops_per_gpu: float | None
    mfu: float | None


def compute_mfu(run: RunResult, recipe_name: str, gpu_name: str, seq_length: int | None = None) -> Mfu:
    """MFU of a run's mean tokens/s/GPU; the sequence length defaults to the run's, then the recipe's."""
    from qwen_pretrain.recipes import get_recipe
    from qwen_pretrain.recipes.hardware import get_gpu
    from qwen_pretrain.recipes.planner import flops_per_token

    recipe = get_recipe(recipe_name)
    gpu = get_gpu(gpu_name)
    seq = seq_length or run.seq_length or recipe.training.seq_length
    seq_from = "--seq-length" if seq_length else "the log" if run.seq_length else "the recipe"
    fpt = flops_per_token(recipe.model, seq)
    tps = run.tokens_per_sec_per_gpu_mean
    model_tflops = tps * fpt / 1e12 if tps is not None else None
    mfu = model_tflops / gpu.peak_bf16_tflops if model_tflops is not None else None
    return Mfu(recipe.name, gpu.name, seq, seq_from, fpt, gpu.peak_bf16_tflops, model_tflops, mfu)


def _fmt(value: float | int | None, spec: str = ",.1f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if spec == ",.1f" and 0 < abs(value) < 1:
        return format(value, ".3g")  # tiny CPU runs: 0.00905 TFLOP/s, not 0.0
    return format(value, spec)


def run_label(run: RunResult, index: int, runs: list[RunResult]) -> str:
    """The file name, or its parent/name when two runs share a file name."""
    p = Path(run.path)
    if sum(Path(r.path).name == p.name for r in runs) > 1:
        return f"{p.parent.name}/{p.name}" if p.parent.name else f"{index}:{p.name}"
    return p.name


def markdown_summary(runs: list[RunResult], mfus: list[Mfu | None], plots: list[str]) -> str:
    labels = [run_label(r, i, runs) for i, r in enumerate(runs)]
    lines = ["# Benchmark report", ""]
    r0 = runs[0]
    lines += [
        f"Rule: mean tokens/s/GPU over the unique steps left after dropping the first {r0.skip_first} "
        f"and the last {r0.skip_last}; a repeated step keeps its last occurrence. "
        "Accuracy: loss at the final step.", "",
        "| run | format | status | steps | averaged steps | tokens/s/GPU | step time (s) | log TFLOP/s/GPU "
        "| model TFLOP/s/GPU | MFU | final step | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r, m in zip(labels, runs, mfus):
        window = f"{r.steps_used} ({r.window_first_step}..{r.window_last_step})" if r.steps_used else "0"
        tps = _fmt(r.tokens_per_sec_per_gpu_mean) + (" (derived)" if r.tokens_per_sec_per_gpu_derived else "")
        status = r.status if r.usable else f"unusable: {r.reason}"
        lines.append(
            f"| {label} | {r.format} | {status} | {r.steps} ({r.first_step}..{r.last_step}) | {window} | {tps} "
            f"| {_fmt(r.step_time_mean_s, '.3f')} | {_fmt(r.tflops_per_gpu_mean)} "
            f"| {_fmt(m.model_tflops_per_gpu if m else None)} | {_fmt(m.mfu if m else None, '.1%')} "
            f"| {_fmt(r.final_step, 'd')} | {_fmt(r.final_loss, '.4f')} |"
        )
    m = next((m for m in mfus if m is not None), None)
    if m is not None:
        lines += ["", f"MFU: recipe `{m.recipe}`, GPU `{m.gpu}` (dense BF16 peak {m.peak_tflops:g} TFLOP/s), "
                  f"{m.flops_per_token / 1e9:.2f} GFLOP per token at seq length {m.seq_length} (from "
                  f"{m.seq_length_from}{'; pass --seq-length if the run used another' if m.seq_length_from == 'the recipe' else ''}), "
                  "Megatron-LM's FLOPs accounting (forward + backward)."]
    for label, r in zip(labels, runs):
        if r.warnings:
            lines += ["", f"Warnings for {label}:"] + [f"- {w}" for w in r.warnings]
    if plots:
        lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _shade_excluded(ax, run: RunResult, color, done: set) -> None:
    """Shade the steps the rule leaves out of the mean (first and last edge steps), each span once."""
    if run.table is None or not run.steps_used:
        return
    steps = run.table.steps
    for span in ((steps[0], run.window_first_step), (run.window_last_step, steps[-1])):
        if span[0] != span[1] and span not in done:
            done.add(span)
            ax.axvspan(*span, color=color, alpha=0.12, lw=0)


def _series(run: RunResult, column: str):
    """(steps, values) of one column where it has a finite value."""
    import numpy as np

    if run.table is None:
        return [], []
    values = run.table.column(column)
    keep = np.isfinite(values)
    return np.asarray(run.table.steps)[keep], values[keep]


def write_plots(runs: list[RunResult], out_dir: Path) -> list[Path]:
    """loss.png and tokens_per_sec.png: every run overlaid, excluded edge steps shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [run_label(r, i, runs) for i, r in enumerate(runs)]
    written = []
    for name, title, ylabel, getter in (
        ("loss.png", "Training loss per step", "loss", lambda r: _series(r, "loss")),
        ("tokens_per_sec.png", "Throughput per step (shaded: steps outside the averaging window)",
         "tokens/s/GPU", lambda r: _series(r, "tokens_per_sec_per_gpu")),
    ):
        fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
        drawn = False
        shaded: set = set()
        for i, (label, run) in enumerate(zip(labels, runs)):
            color = f"C{i % 10}"
            xs, ys = getter(run)
            if not len(xs):
                continue
            drawn = True
            ax.plot(xs, ys, color=color, lw=1.2, label=label, marker="." if len(xs) < 60 else None)
            _shade_excluded(ax, run, color, shaded)
            if name == "tokens_per_sec.png" and run.tokens_per_sec_per_gpu_mean is not None:
                ax.axhline(run.tokens_per_sec_per_gpu_mean, color=color, ls="--", lw=0.8,
                           label=f"{label} mean {run.tokens_per_sec_per_gpu_mean:,.0f}")
        if not drawn:
            ax.text(0.5, 0.5, f"no {ylabel} values in the log(s)", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        path = out_dir / name
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written


def write_report(runs: list[RunResult], out_dir: Path, mfus: list[Mfu | None]) -> dict[str, Path]:
    """report.md, summary.json, loss.png, tokens_per_sec.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(runs, out_dir)
    summary = {"runs": []}
    for r, m in zip(runs, mfus):
        obj = r.to_json()
        if m is not None:
            obj["mfu"] = {k: (v if not (isinstance(v, float) and not math.isfinite(v)) else None)
                          for k, v in m.__dict__.items()}
        summary["runs"].append(obj)
    md_path, json_path = out_dir / "report.md", out_dir / "summary.json"
    atomic_write_bytes(json_path, (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write_bytes(md_path, markdown_summary(runs, mfus, [str(p) for p in plots]).encode())
    return {"markdown": md_path, "json": json_path, **{p.stem: p for p in plots}}


def comparison_table(a: RunResult, b: RunResult, comp: Comparison) -> str:
    la, lb = run_label(a, 0, [a, b]), run_label(b, 1, [a, b])
    rows = [
        ("", la, lb),
        ("format", a.format, b.format),
        ("status", a.status, b.status),
        ("steps", f"{a.steps} ({a.first_step}..{a.last_step})", f"{b.steps} ({b.first_step}..{b.last_step})"),
        ("tokens/s/GPU mean", _fmt(a.tokens_per_sec_per_gpu_mean), _fmt(b.tokens_per_sec_per_gpu_mean)),
        ("step time mean (s)", _fmt(a.step_time_mean_s, ".3f"), _fmt(b.step_time_mean_s, ".3f")),
        ("final step", _fmt(a.final_step, "d"), _fmt(b.final_step, "d")),
        ("final loss", _fmt(a.final_loss, ".4f"), _fmt(b.final_loss, ".4f")),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    worst = ("-" if comp.max_rel_loss_diff is None
             else f"{comp.max_rel_loss_diff:.2%} at step {comp.max_rel_loss_diff_step}")
    lines += [
        "",
        f"common steps with a loss in both: {comp.common_steps}",
        f"loss-curve correlation (Pearson): {_fmt(comp.loss_correlation, '.4f')}",
        f"largest relative loss difference: {worst}",
        f"final loss, A vs B: {'-' if comp.final_loss_rel_diff is None else f'{comp.final_loss_rel_diff:+.2%}'}",
        f"tokens/s/GPU ratio A/B: {_fmt(comp.tokens_per_sec_ratio, '.3f')}",
    ]
    return "\n".join(lines)
