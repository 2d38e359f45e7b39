"""The Megatron-core trainer: one recipe, one readable loop (run under torchrun).

    from qwen_pretrain.training.train import TrainOptions, train
    result = train(recipe, TrainOptions(save="ckpt", log_dir="runs/x"))          # this host's settings
    result = train(recipe, opts, settings_for_this_host(recipe, "cuda"))         # or the named device

Per step: megatron-core DDP (+ the distributed optimizer, AdamW) over `get_forward_backward_func`
(no pipelining, 1F1B, or interleaved 1F1B with VPP), gradient clipping, warmup + cosine LR
(`OptimizerParamScheduler`), a NeMo 2 log line from rank 0 (see `train_log.py`), validation
loss and perplexity every `eval_interval` steps, torch_dist checkpoints every `save_interval`
steps. Device, layer spec, precision, fusions and communication overlap come from
`run_settings.RunSettings` (GPU: TE spec, bf16, fusions, gradient reduce-scatter and parameter
all-gather overlapped with compute; CPU: the unfused fp32 reference). A non-finite loss stops the
run naming the step (or, with `on_nan="skip"`, skips that update).

Step `i` (0-based) always reads the same samples and uses lr(i + 1) of the schedule, so a run
resumed from a checkpoint at step k repeats exactly what the uninterrupted run did after k.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.schema import Recipe
from qwen_pretrain.training import data as data_mod
from qwen_pretrain.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from qwen_pretrain.training.checkpoint_dir import legacy_layer_spec
from qwen_pretrain.training.run_settings import RunSettings, settings_for_this_host
from qwen_pretrain.training.train_log import MetricsWriter, StepMetrics


class NonFiniteLossError(UserError):
    pass


@dataclass(frozen=True)
class TrainOptions:
    load: str | None = None
    save: str | None = None
    save_interval: int = 0  # 0: save only at the end (when save is set)
    log_dir: str | None = None
    on_nan: str = "stop"  # "stop" | "skip"
    gpu: str | None = None  # accelerator name for MFU (recipes.hardware.GPUS); guessed on GPU
    stop_after: int | None = None  # run only up to this step (exclusive): for tests and resumes


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> reduced train loss
    val_losses: dict[int, float] = field(default_factory=dict)
    last_step: int = -1
    checkpoints: list[str] = field(default_factory=list)


@dataclass
class _Setup:
    recipe: Recipe
    settings: RunSettings
    config: Any
    models: list[Any]  # the bare GPTModel chunks (for checkpoints)
    ddp_models: list[Any]  # what the schedule runs
    optimizer: Any
    scheduler: Any
    train_ds: Any
    valid_ds: Any
    dp_rank: int
    dp_size: int
    world: int
    rank: int


def _setup(recipe: Recipe, opts: TrainOptions, settings: RunSettings) -> _Setup:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module
    from qwen_pretrain.training.model import transformer_config
    from qwen_pretrain.training.parallel import build_model_chunks, init_parallel

    init_parallel(recipe, settings)
    t = recipe.training
    config = transformer_config(recipe, settings)
    models = build_model_chunks(recipe, config, settings=settings)
    bf16 = settings.bf16
    if settings.device == "cuda":
        import torch

        # Every module, whatever its precision: megatron-core allocates its own layers on the
        # GPU, but e.g. the local spec's torch.nn.RMSNorm is created on the default device.
        for m in models:
            m.cuda(torch.cuda.current_device())
    wrapped = [Float16Module(config, m) if bf16 else m for m in models]
    ddp_config = DistributedDataParallelConfig(**settings.ddp)
    ddp_models = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=m, disable_bucketing=i > 0)
        for i, m in enumerate(wrapped)
    ]
    opt_config = OptimizerConfig(
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        **{**settings.optimizer, "params_dtype": config.params_dtype},
    )
    optimizer = get_megatron_optimizer(opt_config, ddp_models)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=max(t.train_steps, t.warmup_steps + 1),  # megatron: warmup < decay
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_steps,
        wd_incr_style="constant",
    )
    # What megatron-core's schedules call around the backward passes.
    config.no_sync_func = [m.no_sync for m in ddp_models]
    if len(ddp_models) == 1:
        config.no_sync_func = config.no_sync_func[0]
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if ddp_config.overlap_grad_reduce:
        # As Megatron-LM (align_grad_reduce): under pipeline parallelism the schedules start each
        # chunk's gradient reduce-scatter when its last backward is done.
        grad_sync = [m.start_grad_sync for m in ddp_models]
        config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync

    cache = None if opts.log_dir is None else f"{opts.log_dir}/dataset_cache"
    train_ds, valid_ds = data_mod.build_datasets(recipe, cache_dir=cache)
    return _Setup(
        recipe=recipe,
        settings=settings,
        config=config,
        models=models,
        ddp_models=ddp_models,
        optimizer=optimizer,
        scheduler=scheduler,
        train_ds=train_ds,
        valid_ds=valid_ds,
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        world=dist.get_world_size(),
        rank=dist.get_rank(),
    )


def _loss_func(loss_mask: Any, output_tensor: Any) -> tuple[Any, dict[str, Any]]:
    """Mean loss over this micro-batch's unmasked tokens (all CP ranks of the sequence)."""
    import torch
    from megatron.core import parallel_state as ps

    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    total = torch.stack([torch.sum(losses * mask), mask.sum()])
    cp = ps.get_context_parallel_world_size()
    if cp > 1:
        reduced = total.detach().clone()
        torch.distributed.all_reduce(reduced, group=ps.get_context_parallel_group())
        # DDP averages gradients over DP x CP, hence the factor cp on the local share.
        loss = total[0] / reduced[1].clamp(min=1) * cp
        report = reduced[0] / reduced[1].clamp(min=1)
    else:
        loss = total[0] / total[1].clamp(min=1)
        report = loss.detach().clone()  # the schedule divides `loss` in place
    return loss, {"lm loss": report}


def _forward_step(data_iterator: Any, model: Any) -> tuple[Any, Any]:
    from megatron.core import parallel_state as ps

    batch = next(data_iterator)
    if ps.get_context_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = get_batch_on_this_cp_rank(batch)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch["attention_mask"],
        labels=batch["labels"],
    )
    return output, partial(_loss_func, batch["loss_mask"])


def _to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    if device != "cuda":
        return batch
    return {k: (v.cuda(non_blocking=True) if v is not None else None) for k, v in batch.items()}


@contextmanager
def _parameters_in_sync(s: _Setup) -> Iterator[None]:
    """The parameters as the optimizer left them, for validation and checkpoints.

    With the parameter all-gather overlapped (GPU settings), the distributed optimizer's update
    reaches the parameters only in the next forward's pre-hooks; Megatron-LM forces the gather
    and turns the hooks off around evaluation and checkpoint saves, and so does this.
    """
    if not s.settings.ddp["overlap_param_gather"]:
        yield
        return
    for m in s.ddp_models:
        m.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for m in s.ddp_models:
            m.enable_forward_pre_hook()


def _run_schedule(s: _Setup, dataset: Any, step: int, base: int, forward_only: bool) -> float:
    """Forward (and backward) over one global batch; returns the loss averaged over DP ranks."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    r = s.recipe
    indices = data_mod.micro_batch_indices(r, step, s.dp_rank, s.dp_size, base=base)
    batches = [_to_device(data_mod.collate(dataset, idx), s.settings.device) for idx in indices]
    # With VPP every model chunk walks the same micro-batches in its own order.
    iterators = [iter(batches) for _ in s.ddp_models]
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=s.ddp_models,
        num_microbatches=len(batches),
        seq_length=r.training.seq_length,
        micro_batch_size=r.parallel.micro_batch_size,
        decoder_seq_length=r.training.seq_length,
        forward_only=forward_only,
    )
    # Losses exist on the last pipeline stage only; sum over the world, divide by its count.
    acc = torch.zeros(2, dtype=torch.float64, device=s.settings.device)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and losses:
        acc[0] = sum(float(x["lm loss"]) for x in losses) / len(losses)
        acc[1] = 1.0
    torch.distributed.all_reduce(acc)
    return float(acc[0] / acc[1])


def _evaluate(s: _Setup, step: int) -> float:
    import torch

    t = s.recipe.training
    eval_index = (step + 1) // t.eval_interval - 1
    for m in s.ddp_models:
        m.eval()
    with torch.no_grad(), _parameters_in_sync(s):
        losses = [
            _run_schedule(s, s.valid_ds, eval_index * t.eval_iters + k, 0, forward_only=True)
            for k in range(t.eval_iters)
        ]
    for m in s.ddp_models:
        m.train()
    return sum(losses) / len(losses)


def _flops_per_gpu_per_s(recipe: Recipe, step_time: float, world: int) -> float:
    from qwen_pretrain.recipes.planner import flops_per_token

    m, t = recipe.model, recipe.training
    per_token = flops_per_token(m, t.seq_length, m.padded_vocab_size(recipe.parallel.tp))
    return per_token * recipe.tokens_per_step / step_time / world


def _gpu_peak_tflops(name: str | None, device: str) -> float | None:
    """Peak of the named accelerator, or of the one torch sees; None on CPU."""
    import torch
    from qwen_pretrain.recipes.hardware import GPUS, get_gpu

    if name is None:
        if device != "cuda":
            return None
        device = torch.cuda.get_device_name().lower()
        name = next((key for key in GPUS if key in device), None)
        if name is None:
            return None
    return get_gpu(name).peak_bf16_tflops


def check_loadable_format(load_dir: str, settings: RunSettings) -> None:
    """Refuse a legacy (per-rank `torch.save`) checkpoint in one line before any work: its names
    belong to the layer spec it was written for, and the trainer resumes from torch_dist, whose
    names do not depend on the spec."""
    written_for = legacy_layer_spec(load_dir)
    if written_for is None:
        return
    if written_for != settings.layer_spec:
        raise UserError(
            f"--load {load_dir}: a legacy checkpoint written for the {written_for} layer spec, but this run "
            f"builds the {settings.layer_spec} spec ({settings.device}"
            f"{', Transformer Engine' if settings.transformer_engine else ''}): convert again with "
            "`qwen-pretrain convert hf-to-mcore --format torch_dist` (any spec loads it), or "
            f"`--format legacy --layer-spec {settings.layer_spec}` for Megatron-LM"
        )
    raise UserError(
        f"--load {load_dir}: a legacy ({written_for} layer spec) checkpoint, which Megatron-LM and MindSpeed "
        "load; this trainer loads torch_dist: convert with `qwen-pretrain convert hf-to-mcore --format torch_dist`"
    )


def train(recipe: Recipe, opts: TrainOptions, settings: RunSettings | None = None) -> TrainResult:
    """Run (or resume) training of `recipe` on this torchrun world; returns rank-local results.

    `settings` default: this host's (`settings_for_this_host`: CUDA where visible, tiny recipes
    on CPU, Transformer Engine where it imports)."""
    import torch.distributed as dist

    if opts.on_nan not in ("stop", "skip"):
        raise UserError(f"--on-nan {opts.on_nan}: choose stop or skip")
    settings = settings or settings_for_this_host(recipe)
    if opts.load:
        check_loadable_format(opts.load, settings)
    s = _setup(recipe, opts, settings)
    t = recipe.training
    peak = _gpu_peak_tflops(opts.gpu, settings.device)
    writer = MetricsWriter(opts.log_dir if s.rank == 0 else None)
    if s.rank != 0:
        writer.print = lambda line: None  # type: ignore[method-assign]
    state = TrainState()
    if opts.load:
        loaded = load_checkpoint(
            opts.load, s.models, s.optimizer, s.scheduler, shape=recipe.model, tp=recipe.parallel.tp
        )
        if loaded is not None:
            state = loaded
            if state.iteration:
                writer.print(f"Resumed from {opts.load} at step {state.iteration}")
            else:
                writer.print(f"Loaded weights from {opts.load} (no training state): starting at step 0")
    result = TrainResult()
    end = t.train_steps if opts.stop_after is None else min(opts.stop_after, t.train_steps)
    writer.print(
        f"Training {recipe.name}{' (OFF-BENCHMARK)' if recipe.off_benchmark else ''}: "
        f"{end - state.iteration} steps from step {state.iteration}, world {s.world} "
        f"(TP {recipe.parallel.tp} PP {recipe.parallel.pp} VPP {recipe.parallel.vpp or 1} "
        f"CP {recipe.parallel.cp} EP {recipe.parallel.ep} DP {s.dp_size}), "
        f"global batch {t.global_batch_size} x seq {t.seq_length}, "
        f"data: {'mock' if not recipe.data.blend else f'{len(recipe.data.blend)} prefix(es)'}"
    )
    ddp = settings.ddp
    writer.print(
        f"Run settings: device {settings.device}, {settings.layer_spec} layer spec, {settings.precision}, "
        f"{settings.process_group_backend}, overlap: grad reduce {'on' if ddp['overlap_grad_reduce'] else 'off'}, "
        f"param gather {'on' if ddp['overlap_param_gather'] else 'off'}"
    )
    try:
        for step in range(state.iteration, end):
            result.last_step = step
            start = time.perf_counter()
            for m in s.ddp_models:
                m.zero_grad_buffer()
            s.optimizer.zero_grad()
            loss = _run_schedule(s, s.train_ds, step, 0, forward_only=False)
            skipped = not math.isfinite(loss)
            grad_norm = None
            if skipped and opts.on_nan == "stop":
                raise NonFiniteLossError(
                    f"non-finite training loss ({loss}) at step {step} (global_step {step}): "
                    "stopping; pass --on-nan skip to skip such steps instead",
                    exit_code=3,
                )
            lr = s.optimizer.param_groups[0]["lr"]
            if not skipped:
                # lr(step + 1) for step `step`: the first step does not run at lr 0.
                s.scheduler.step(increment=1)
                lr = s.optimizer.param_groups[0]["lr"]
                ok, grad_norm, _ = s.optimizer.step()
                if not ok:
                    skipped = True
            step_time = time.perf_counter() - start
            state.iteration = step + 1
            state.consumed_samples += t.global_batch_size
            if t.eval_interval > 0 and ((step + 1) % t.eval_interval == 0):
                state.val_loss = _evaluate(s, step)
                result.val_losses[step] = state.val_loss
                writer.validation(step, state.val_loss)
            flops = _flops_per_gpu_per_s(recipe, step_time, s.world)
            record = StepMetrics(
                step=step,
                train_steps=t.train_steps,
                lr=lr,
                global_batch_size=t.global_batch_size,
                loss=loss,
                step_time_s=step_time,
                tokens_per_sec_per_gpu=recipe.tokens_per_step / step_time / s.world,
                consumed_samples=state.consumed_samples,
                val_loss=state.val_loss,
                tflops_per_gpu=flops / 1e12,
                mfu=None if peak is None else flops / 1e12 / peak,
                grad_norm=None if grad_norm is None else float(grad_norm),
                skipped=skipped,
            )
            if not skipped:
                result.losses[step] = loss
            writer.step(record)
            last = step + 1 == end
            if opts.save and (
                (opts.save_interval > 0 and (step + 1) % opts.save_interval == 0) or last
            ):
                with _parameters_in_sync(s):
                    path = save_checkpoint(opts.save, s.models, s.optimizer, s.scheduler, state)
                result.checkpoints.append(str(path))
                writer.print(f"Saved checkpoint {path}")
    finally:
        writer.close()
    dist.barrier()
    return result
