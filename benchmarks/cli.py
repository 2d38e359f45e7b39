"""`qwen-pretrain bench parse|accept|report|compare`: training logs to acceptance verdicts;
`bench gpu-check`: a prepared check of one GPU node (benchmarks/gpu_check.py).

Exit codes: 0 ok / passed, 1 failed (accept), 2 unusable log or bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_pretrain.benchmarks.logformats import FORMATS
from qwen_pretrain.benchmarks.rule import DEFAULT_SKIP_FIRST, DEFAULT_SKIP_LAST
from qwen_pretrain.recipes.cli_args import positive_int

if TYPE_CHECKING:
    from qwen_pretrain.benchmarks.runs import RunResult


def _common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("parsing and the averaging rule")
    g.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                   help="log format (default: auto-detect)")
    g.add_argument("--skip-first", type=int, default=DEFAULT_SKIP_FIRST, metavar="N",
                   help="unique steps dropped at the start before averaging (default 10)")
    g.add_argument("--skip-last", type=int, default=DEFAULT_SKIP_LAST, metavar="N",
                   help="unique steps dropped at the end before averaging (default 10)")
    g.add_argument("--allow-short", action="store_true",
                   help="average over all steps when the log is too short for the rule instead of exit 2")
    g.add_argument("--seq-length", type=positive_int, metavar="N",
                   help="sequence length, to derive tokens/s for logs without it (Megatron-LM, Bridge, MindSpeed)")
    g.add_argument("--global-batch-size", type=positive_int, metavar="N",
                   help="global batch size for the derivation (default: from the log)")
    g.add_argument("--gpus", type=positive_int, metavar="N", help="GPU count of the run, for the derivation")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="parse training logs; acceptance verdicts, reports and plots",
        description="Parse NeMo 2 / Megatron-LM / Megatron-Bridge / MindSpeed / nanotron / our trainer's "
        "logs. Performance: mean tokens/s/GPU without the first and last 10 unique steps. "
        "Accuracy: final-step loss within 5%% of a baseline.")
    sub = parser.add_subparsers(dest="bench_command", metavar="ACTION", required=True)
    common = _common_parser()

    p = sub.add_parser("parse", parents=[common], help="figures of one or more logs")
    p.add_argument("logs", nargs="+", metavar="LOG")
    p.add_argument("--json", action="store_true", help="one JSON object per log, one per line")
    p.set_defaults(func=cmd_parse)

    p = sub.add_parser("accept", parents=[common], help="PASS/FAIL of a run against a baseline")
    p.add_argument("log", metavar="LOG")
    p.add_argument("--baseline", required=True, metavar="LOG|JSON|NUMBER",
                   help="baseline log, its `bench parse --json` output, or its final loss")
    p.add_argument("--loss-tol", type=float, default=0.05, metavar="F",
                   help="allowed relative difference of the final loss (default 0.05 = 5%%)")
    p.add_argument("--perf-baseline", metavar="X|LOG|JSON",
                   help="baseline tokens/s/GPU (a number, or a log/JSON whose mean is used)")
    p.add_argument("--perf-tol", type=float, default=0.05, metavar="F",
                   help="allowed relative shortfall of tokens/s/GPU (default 0.05; faster always passes)")
    p.add_argument("--json", action="store_true", help="the verdict as JSON")
    p.set_defaults(func=cmd_accept)

    p = sub.add_parser("report", parents=[common], help="Markdown + JSON summary, MFU and PNG plots")
    p.add_argument("logs", nargs="+", metavar="LOG")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--recipe", help="recipe whose model gives the FLOPs per token for MFU")
    p.add_argument("--gpu", choices=("h100", "h200", "b200", "a100", "910b"), help="GPU whose peak gives MFU")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", parents=[common], help="two runs side by side: loss correlation, worst gap")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("gpu-check", help="one GPU node, about 10 min: versions, our trainer vs transformers, "
                       "conversion logits", description="Train qwen3_0p6b with the GPU run settings and with plain "
                       "transformers + torch.compile on this GPU, convert a random-weight model and compare "
                       "logits in the TE-spec trainer model (benchmarks/gpu_check.py).")
    p.add_argument("--out", default="gpu_check", metavar="DIR", help="results and logs (default gpu_check/)")
    p.add_argument("--steps", type=positive_int, default=30, help="training steps of each side (default 30)")
    p.add_argument("--no-te", action="store_true", help="this GPU host has no Transformer Engine (local spec)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit, on any machine")
    p.set_defaults(func=cmd_gpu_check)

    from qwen_pretrain.evaluation.cli import add_bench_generate  # generation speed (eval area)

    add_bench_generate(sub)


def cmd_gpu_check(args: argparse.Namespace) -> int:
    from qwen_pretrain.benchmarks.gpu_check import cmd_gpu_check as run

    return run(args)


def _parse_kwargs(args: argparse.Namespace) -> dict:
    from qwen_pretrain.benchmarks.runs import Derivation  # numpy: not at `--help` time

    return dict(
        fmt=args.format, skip_first=args.skip_first, skip_last=args.skip_last, allow_short=args.allow_short,
        derivation=Derivation(args.seq_length, args.global_batch_size, args.gpus),
    )


def _parse(path: str, args: argparse.Namespace) -> RunResult:
    """Parse one log, with a byte progress bar on a terminal."""
    from qwen_pretrain.benchmarks.runs import check_log_path, parse_run

    p = check_log_path(path)
    show = not args.no_progress and sys.stderr.isatty()
    if not show:
        return parse_run(p, **_parse_kwargs(args))
    from tqdm import tqdm

    with tqdm(total=p.stat().st_size, unit="B", unit_scale=True, desc=p.name, file=sys.stderr, leave=False) as bar:
        return parse_run(p, progress=bar.update, **_parse_kwargs(args))


def _human(run: RunResult) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"{run.path}: format {run.format}, {run.steps} unique steps"
             + (f" ({run.first_step}..{run.last_step})" if run.steps else "")]
    if run.steps_used:
        lines.append(f"  averaged {run.steps_used} steps ({run.window_first_step}..{run.window_last_step}; "
                     f"first {run.skip_first} and last {run.skip_last} dropped)")
    tps = f(run.tokens_per_sec_per_gpu_mean, ",.1f") + (" (derived)" if run.tokens_per_sec_per_gpu_derived else "")
    lines.append(f"  tokens/s/GPU mean: {tps}   step time mean: {f(run.step_time_mean_s, '.3f')} s"
                 + (f"   TFLOP/s/GPU (log): {run.tflops_per_gpu_mean:,.4g}" if run.tflops_per_gpu_mean else ""))
    lines.append(f"  final step: {f(run.final_step, 'd')}   final loss: {f(run.final_loss, '.4f')}")
    lines += [f"  warning: {w}" for w in run.warnings]
    if not run.usable:
        lines.append(f"  UNUSABLE: {run.reason}")
    return "\n".join(lines)


def cmd_parse(args: argparse.Namespace) -> int:
    rc = 0
    for path in args.logs:
        run = _parse(path, args)
        print(json.dumps(run.to_json()) if args.json else _human(run), flush=True)
        if not run.usable:
            print(f"qwen-pretrain bench parse: {path}: unusable: {run.reason}", file=sys.stderr)
            rc = 2
    return rc


def cmd_accept(args: argparse.Namespace) -> int:
    from qwen_pretrain.benchmarks.acceptance import accept, load_baseline, verdict_table
    from qwen_pretrain.recipes.errors import UserError

    run = _parse(args.log, args)
    baseline = load_baseline(args.baseline, **_parse_kwargs(args))
    perf = None
    if args.perf_baseline is not None:
        try:
            perf = float(args.perf_baseline)
        except ValueError:
            perf = load_baseline(args.perf_baseline, **_parse_kwargs(args)).tokens_per_sec_per_gpu_mean
            if perf is None:
                raise UserError(f"--perf-baseline {args.perf_baseline}: has no tokens/s/GPU mean") from None
    verdict = accept(run, baseline, args.loss_tol, perf, args.perf_tol)
    if args.json:
        print(json.dumps({"status": verdict.status, "reason": verdict.reason, "baseline": baseline.source,
                          "checks": [c.__dict__ for c in verdict.checks], "run": run.to_json()}))
    else:
        print(f"run: {run.path} ({run.format})   baseline: {baseline.source}")
        for w in run.warnings:
            print(f"warning: {w}")
        print(verdict_table(verdict))
    return verdict.exit_code


def cmd_report(args: argparse.Namespace) -> int:
    from qwen_pretrain.benchmarks.report import compute_mfu, write_report
    from qwen_pretrain.recipes.errors import UserError

    if (args.recipe is None) != (args.gpu is None):
        raise UserError("MFU needs both --recipe NAME and --gpu h100|h200|b200|a100|910b (or neither)")
    runs = [_parse(path, args) for path in args.logs]
    mfus = [compute_mfu(r, args.recipe, args.gpu, args.seq_length) if args.recipe else None for r in runs]
    written = write_report(runs, args.out, mfus)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    bad = [r for r in runs if not r.usable]
    for r in bad:
        print(f"qwen-pretrain bench report: {r.path}: unusable: {r.reason}", file=sys.stderr)
    return 2 if bad else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from qwen_pretrain.benchmarks.acceptance import compare_runs
    from qwen_pretrain.benchmarks.report import comparison_table

    a, b = _parse(args.a, args), _parse(args.b, args)
    comp = compare_runs(a, b)
    if args.json:
        print(json.dumps({"a": a.to_json(), "b": b.to_json(), "comparison": comp.__dict__}))
    else:
        print(comparison_table(a, b, comp))
    if comp.common_steps == 0:
        print("qwen-pretrain bench compare: the two logs have no common step with a loss", file=sys.stderr)
        return 2
    return 0
