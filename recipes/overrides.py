"""Changing a recipe from the CLI or from Python, with the acceptance table guarded.

Parallelism is free. Global batch, sequence length and seed of an acceptance recipe are fixed
by the acceptance table, and so is the minimum GPU count: changing any of them needs an explicit
`off_benchmark=True` (`--off-benchmark`), and the resulting recipe is marked so that every
output shows it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.schema import Recipe


class OffBenchmarkError(UserError):
    pass


_UNSET: Any = object()

_PARALLEL_FIELDS = {
    "tp": "tp",
    "pp": "pp",
    "vpp": "vpp",
    "cp": "cp",
    "ep": "ep",
    "etp": "etp",
    "sequence_parallel": "sequence_parallel",
    "mbs": "micro_batch_size",
    "micro_batch_size": "micro_batch_size",
    "use_distributed_optimizer": "use_distributed_optimizer",
    "recompute": "recompute",
}
_TRAINING_FIELDS = {
    "gbs": "global_batch_size",
    "global_batch_size": "global_batch_size",
    "seq_length": "seq_length",
    "seed": "seed",
    "train_steps": "train_steps",
    "lr": "lr",
    "min_lr": "min_lr",
    "warmup_steps": "warmup_steps",
    "precision": "precision",
    "eval_interval": "eval_interval",
    "eval_iters": "eval_iters",
}


def override(
    recipe: Recipe,
    *,
    gpus: int | None = None,
    off_benchmark: bool = False,
    **changes: Any,
) -> Recipe:
    """A copy of `recipe` with `changes` applied.

    Keys are parallelism fields (`tp pp vpp cp ep etp sequence_parallel mbs recompute
    use_distributed_optimizer`) or training fields (`gbs seq_length seed train_steps lr min_lr
    warmup_steps precision eval_interval eval_iters`); a value of None means "keep", except for
    `vpp`, where 0 turns interleaving off. Two derived adjustments, so that a plain `tp=1` or
    `pp=1` stays runnable: sequence parallelism is dropped when TP becomes 1 and VPP when PP
    becomes 1, unless the caller sets them explicitly.
    """
    unknown = sorted(set(changes) - set(_PARALLEL_FIELDS) - set(_TRAINING_FIELDS))
    if unknown:
        raise UserError(f"unknown recipe override(s): {', '.join(unknown)}")

    par = {_PARALLEL_FIELDS[k]: v for k, v in changes.items() if k in _PARALLEL_FIELDS}
    if "vpp" in par and par["vpp"] == 0:
        par["vpp"] = _UNSET  # explicit "off"
    par = {k: v for k, v in par.items() if v is not None}
    if par.get("vpp") is _UNSET:
        par["vpp"] = None
    train = {
        _TRAINING_FIELDS[k]: v
        for k, v in changes.items()
        if k in _TRAINING_FIELDS and v is not None
    }

    parallel = dataclasses.replace(recipe.parallel, **par)
    if "sequence_parallel" not in par and parallel.tp == 1:
        parallel = dataclasses.replace(parallel, sequence_parallel=False)
    if "vpp" not in par and parallel.pp == 1:
        parallel = dataclasses.replace(parallel, vpp=None)
    training = dataclasses.replace(recipe.training, **train)
    new_gpus = recipe.gpus if gpus is None else gpus

    departures = _acceptance_departures(recipe, training, new_gpus)
    if departures and not off_benchmark:
        raise OffBenchmarkError(
            f"recipe '{recipe.name}' is an acceptance benchmark and {'; '.join(departures)}: "
            "pass --off-benchmark (Python: off_benchmark=True) to run it anyway, "
            "marked OFF-BENCHMARK"
        )
    return dataclasses.replace(
        recipe,
        gpus=new_gpus,
        parallel=parallel,
        training=training,
        off_benchmark=recipe.off_benchmark or bool(departures),
    )


def _acceptance_departures(recipe: Recipe, training: Any, gpus: int) -> list[str]:
    acc = recipe.acceptance
    if acc is None:
        return []
    out = []
    for field, fixed in (
        ("global_batch_size", acc.global_batch_size),
        ("seq_length", acc.seq_length),
        ("seed", acc.seed),
    ):
        value = getattr(training, field)
        if value != fixed:
            out.append(f"{field} is fixed at {fixed} by the acceptance table (asked: {value})")
    if gpus < acc.gpus:
        out.append(f"the acceptance baseline needs at least {acc.gpus} GPUs (asked: {gpus})")
    return out
