"""`qwen-pretrain train-reference`: an independent reference trainer to judge ours against.

    qwen-pretrain train-reference --recipe qwen3_tiny --init HF_DIR --data-path PREFIX \\
        --log-dir runs/reference > reference.log

Written apart from the Megatron-core trainer (`training/`), from public definitions only: the
recipe's model as a Hugging Face `transformers` model (Qwen3, Qwen2/2.5, Qwen3-MoE), one process,
fp32 on CPU, `torch.optim.AdamW`, plain gradient accumulation over the micro-batches. What it
shares with ours is what an acceptance comparison must hold fixed, and nothing else:

- the weights: it starts from `--init HF_DIR` (ours loads the same weights through
  `convert hf-to-mcore`, or ours at step 0 is converted with `convert mcore-to-hf`);
- the samples: megatron-core's `GPTDataset` gives the sample order (`training/data.py`), step `s`
  reads samples `s*gbs .. s*gbs+gbs-1` in micro-batches of the recipe's size;
- the log: the NeMo 2 line through the same formatter (`training/train_log.py`), so `bench`
  parses both logs alike, plus `metrics.jsonl` with the losses at full precision.

The optimisation follows the recipe's hyperparameters, written out here from Megatron-LM's
published definitions (the same ones our trainer gets from megatron-core):

- loss: per micro-batch, the mean token cross-entropy over the loss mask; the step's loss is the
  mean over micro-batches, and each micro-batch's gradient is scaled by 1/micro-batches;
- vocabulary: the output layer has the rows Megatron pads the vocabulary to (a multiple of 128 x
  TP, `--pad-vocab-as-tp`, default the recipe's TP); the extra rows start at zero, as
  `convert hf-to-mcore` pads them, and are never a target but take part in the softmax;
- AdamW (decoupled weight decay) with the recipe's betas, eps and weight decay; no decay on 1-D
  parameters (norm weights) and biases, as Megatron-LM's default parameter groups;
- learning rate for step `s` (0-based) is lr(s + 1): linear warmup from 0 over `warmup_steps`,
  then cosine (or linear) decay to `min_lr` at `train_steps`, constant `min_lr` after;
- gradient clipping to the global L2 norm `clip_grad` (coefficient clip / (norm + 1e-6));
- Qwen3-MoE: the router's load-balancing loss per layer, Switch-style as Megatron-LM defines it
  (coeff x E x sum_e f_e P_e, f_e the share of top-k assignments, P_e the mean probability),
  added to the gradient, not to the reported loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.schema import ModelShape, Recipe, Training


@dataclass(frozen=True)
class ReferenceOptions:
    init: Path  # Hugging Face directory with the initial weights
    log_dir: str | None = None  # metrics.jsonl (and TensorBoard scalars) go here
    save: Path | None = None  # final weights as a Hugging Face directory
    pad_vocab_as_tp: int | None = None  # None: the recipe's TP; 1 leaves a multiple of 128 as is
    threads: int | None = None  # torch intra-op threads (None: torch's default)


@dataclass
class ReferenceResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss
    val_losses: dict[int, float] = field(default_factory=dict)
    grad_norms: dict[int, float] = field(default_factory=dict)
    lrs: dict[int, float] = field(default_factory=dict)


def learning_rate(t: Training, step: int) -> float:
    """The learning rate of 0-based step `step`: the schedule evaluated after `step + 1` steps.

    Linear warmup from 0 to `lr` over `warmup_steps`, then decay to `min_lr` over the rest of
    `train_steps` (at least one step past the warmup), as Megatron-LM's `--lr-warmup-iters`,
    `--lr-decay-iters = --train-iters` and `--lr-decay-style`.
    """
    n = step + 1
    if t.warmup_steps > 0 and n <= t.warmup_steps:
        return t.lr * n / t.warmup_steps
    if t.lr_decay_style == "constant":
        return t.lr
    decay_steps = max(t.train_steps, t.warmup_steps + 1)
    if n > decay_steps:
        return t.min_lr
    progress = (n - t.warmup_steps) / (decay_steps - t.warmup_steps)
    if t.lr_decay_style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * progress) + 1.0)
    elif t.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:
        raise UserError(f"lr_decay_style '{t.lr_decay_style}': the reference knows cosine, linear, constant")
    return t.min_lr + coeff * (t.lr - t.min_lr)


def parameter_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on 1-D parameters (norms) and biases.

    `named_parameters` lists a tied embedding once, so it is decayed and updated once.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def hf_config(shape: ModelShape, vocab_rows: int | None = None) -> Any:
    """The transformers config of `shape` (conversion's config.json for it), `vocab_rows` output rows."""
    import transformers
    from qwen_pretrain.conversion.hf_io import hf_config_for

    cfg = hf_config_for(shape)
    if vocab_rows is not None:
        cfg["vocab_size"] = vocab_rows
    model_type = cfg.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **cfg)


def write_initial_weights(shape: ModelShape, out: Path, seed: int) -> Path:
    """A freshly initialised transformers model of `shape` (its own init, seeded) saved to `out`
    as a Hugging Face directory: the common starting point of ours and the reference."""
    import torch
    import transformers
    from qwen_pretrain.recipes.files import atomic_dir

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.float32)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
    return Path(out)


def _load_model(recipe: Recipe, init: Path, vocab_rows: int) -> Any:
    """The `--init` weights in a transformers model of the recipe's shape, vocabulary padded."""
    import torch
    import transformers
    from qwen_pretrain.conversion.hf_io import read_config, resolve_shape

    if not (Path(init) / "config.json").is_file():
        raise UserError(f"--init {init}: not a Hugging Face model directory (no config.json)")
    resolve_shape(read_config(Path(init)), recipe.name)  # one-line refusal of another shape
    model = transformers.AutoModelForCausalLM.from_pretrained(str(init), dtype=torch.float32)
    if vocab_rows != recipe.model.vocab_size:
        # Megatron's padded rows: extra logits in the softmax, zero at the start as
        # `convert hf-to-mcore` writes them.
        model.resize_token_embeddings(vocab_rows, mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[recipe.model.vocab_size:].zero_()
            out = model.get_output_embeddings()
            if out is not None and not recipe.model.tie_embeddings:
                out.weight[recipe.model.vocab_size:].zero_()
    model.train()
    return model


def _router_balance_loss(router_logits: Any, shape: ModelShape) -> Any:
    """Megatron-LM's per-layer Switch load-balancing loss, summed over the MoE layers."""
    import torch

    total = 0.0
    e, k = shape.num_experts or 0, shape.moe_router_topk
    for logits in router_logits:
        logits = logits.reshape(-1, e).float()
        probs = torch.softmax(logits, dim=-1)
        chosen = torch.topk(logits, k, dim=-1).indices
        counts = torch.zeros(e, dtype=probs.dtype).scatter_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), dtype=probs.dtype)
        )
        tokens = logits.shape[0]
        total = total + shape.moe_aux_loss_coeff * e / (tokens * tokens * k) * (probs.sum(0) * counts).sum()
    return total


def _micro_batch_loss(model: Any, batch: dict[str, Any], shape: ModelShape) -> tuple[Any, Any]:
    """(mean token cross-entropy over the loss mask, load-balancing loss or 0)."""
    import torch
    import torch.nn.functional as F

    kwargs: dict[str, Any] = {"output_router_logits": True} if shape.is_moe else {}
    out = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], use_cache=False, **kwargs)
    logits = out.logits.float()
    tokens = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="none")
    mask = batch["loss_mask"].reshape(-1).float()
    loss = (tokens * mask).sum() / mask.sum().clamp(min=1)
    balance = _router_balance_loss(out.router_logits, shape) if shape.is_moe else torch.zeros(())
    return loss, balance


def _global_batch(recipe: Recipe, dataset: Any, step: int) -> list[dict[str, Any]]:
    from qwen_pretrain.training import data as data_mod

    indices = data_mod.micro_batch_indices(recipe, step, dp_rank=0, dp_size=1)
    return [data_mod.collate(dataset, idx) for idx in indices]


def _evaluate(model: Any, recipe: Recipe, valid_ds: Any, step: int) -> float:
    """Mean loss over `eval_iters` global batches of the validation split (the same batches as ours)."""
    import torch

    t = recipe.training
    eval_index = (step + 1) // t.eval_interval - 1
    model.eval()
    losses = []
    with torch.no_grad():
        for k in range(t.eval_iters):
            batches = _global_batch(recipe, valid_ds, eval_index * t.eval_iters + k)
            losses.append(sum(float(_micro_batch_loss(model, b, recipe.model)[0]) for b in batches) / len(batches))
    model.train()
    return sum(losses) / len(losses)


def _save(model: Any, shape: ModelShape, out: Path) -> None:
    """The final weights as a Hugging Face directory of the real vocabulary (padding dropped)."""
    from qwen_pretrain.recipes.files import atomic_dir

    if model.get_input_embeddings().weight.shape[0] != shape.vocab_size:
        model.resize_token_embeddings(shape.vocab_size, mean_resizing=False)
    with atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp)


def train_reference(recipe: Recipe, opts: ReferenceOptions) -> ReferenceResult:
    """Train `recipe` from `opts.init` in this process; prints NeMo 2 lines to stdout."""
    import torch
    from qwen_pretrain.recipes.planner import flops_per_token
    from qwen_pretrain.training import data as data_mod
    from qwen_pretrain.training.train_log import MetricsWriter, StepMetrics

    if recipe.data.reset_attention_mask:
        raise UserError("train-reference: per-document attention masks are not supported (plain causal only)")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    t, m = recipe.training, recipe.model
    tp = recipe.parallel.tp if opts.pad_vocab_as_tp is None else opts.pad_vocab_as_tp
    vocab_rows = m.padded_vocab_size(tp)
    model = _load_model(recipe, opts.init, vocab_rows)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, t.weight_decay), lr=0.0, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps
    )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # No index cache: megatron-core writes it on rank 0 of a process group, and this process has
    # none. The indices are the same either way (seeded), built in memory in a second or two.
    train_ds, valid_ds = data_mod.build_datasets(recipe, cache_dir=None)
    per_token = flops_per_token(m, t.seq_length, vocab_rows)
    writer = MetricsWriter(opts.log_dir)
    writer.print(
        f"Reference training {recipe.name} (transformers {type(model).__name__}, torch AdamW, one process, "
        f"fp32, {torch.get_num_threads()} threads): {t.train_steps} steps, global batch "
        f"{t.global_batch_size} x seq {t.seq_length}, vocabulary {m.vocab_size} padded to {vocab_rows}, "
        f"data: {'mock' if not recipe.data.blend else f'{len(recipe.data.blend)} prefix(es)'}"
    )
    result = ReferenceResult()
    val_loss = None
    try:
        for step in range(t.train_steps):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            batches = _global_batch(recipe, train_ds, step)
            total = 0.0
            for batch in batches:
                loss, balance = _micro_batch_loss(model, batch, m)
                ((loss + balance) / len(batches)).backward()
                total += float(loss.detach())
            loss_value = total / len(batches)
            if not math.isfinite(loss_value):
                raise UserError(f"train-reference: non-finite loss ({loss_value}) at step {step}", exit_code=3)
            lr = learning_rate(t, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # clip_grad 0 means no clipping (Megatron-LM's --clip-grad 0): the norm is still logged.
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.clip_grad if t.clip_grad > 0 else math.inf))
            optimizer.step()
            step_time = time.perf_counter() - start
            if t.eval_interval > 0 and (step + 1) % t.eval_interval == 0:
                val_loss = _evaluate(model, recipe, valid_ds, step)
                result.val_losses[step] = val_loss
                writer.validation(step, val_loss)
            result.losses[step], result.grad_norms[step], result.lrs[step] = loss_value, grad_norm, lr
            writer.step(StepMetrics(
                step=step, train_steps=t.train_steps, lr=lr, global_batch_size=t.global_batch_size,
                loss=loss_value, step_time_s=step_time,
                tokens_per_sec_per_gpu=recipe.tokens_per_step / step_time,
                consumed_samples=(step + 1) * t.global_batch_size, val_loss=val_loss,
                tflops_per_gpu=per_token * recipe.tokens_per_step / step_time / 1e12, grad_norm=grad_norm,
            ))  # fmt: skip
    finally:
        writer.close()
    if opts.save is not None:
        _save(model, m, opts.save)
        writer.print(f"Saved Hugging Face weights {opts.save}")
    return result


def read_losses(metrics_jsonl: Path) -> dict[int, float]:
    """step -> training loss at full precision from a run's metrics.jsonl (last record wins)."""
    losses: dict[int, float] = {}
    for line in Path(metrics_jsonl).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("kind") == "train" and not rec.get("skipped"):
            losses[int(rec["step"])] = float(rec["loss"])
    return losses


# ---------------------------------------------------------------- command line


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train-reference",
        help="the independent reference trainer (transformers + torch AdamW, one process) to judge ours against",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--recipe", required=True, metavar="NAME", help="recipe name (see `recipes list`)")
    p.add_argument("--init", type=Path, required=True, help="Hugging Face directory with the initial weights")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data-path", nargs="+", metavar="W_OR_PREFIX",
                      help="PREFIX or W1 PREFIX1 W2 PREFIX2 ... (the same as `train`)")
    data.add_argument("--mock-data", action="store_true", help="megatron-core MockGPTDataset (default without --data-path)")
    p.add_argument("--split", default=None, help="train,valid,test weights (default: the recipe's)")
    g = p.add_argument_group("recipe overrides (the same meaning as for `train`)")
    g.add_argument("--train-steps", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--eval-interval", type=int, help="validate every N steps (0: never)")
    g.add_argument("--eval-iters", type=int)
    g.add_argument("--mbs", type=int, help="micro batch size")
    g.add_argument("--gbs", type=int, help="global batch size (acceptance recipes: needs --off-benchmark)")
    g.add_argument("--seq-length", type=int, help="sequence length (acceptance recipes: needs --off-benchmark)")
    g.add_argument("--seed", type=int, help="random seed (acceptance recipes: needs --off-benchmark)")
    g.add_argument("--off-benchmark", action="store_true", help="allow changing what the acceptance table fixes")
    p.add_argument("--pad-vocab-as-tp", type=int, default=None, metavar="TP",
                   help="output rows as Megatron pads the vocabulary at this TP (default: the recipe's TP)")
    p.add_argument("--log-dir", help="metrics.jsonl (losses at full precision) and TensorBoard scalars go here")
    p.add_argument("--save", type=Path, help="write the final weights here (Hugging Face directory)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, OMP_NUM_THREADS)")
    p.set_defaults(func=run)


def reference_recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe with the command line's overrides; the data as `train` reads it."""
    from qwen_pretrain.recipes import get_recipe, override

    recipe = override(
        get_recipe(args.recipe), off_benchmark=args.off_benchmark, mbs=args.mbs, gbs=args.gbs,
        seq_length=args.seq_length, seed=args.seed, train_steps=args.train_steps, lr=args.lr,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters,
    )  # fmt: skip
    t, mbs = recipe.training, recipe.parallel.micro_batch_size
    if mbs < 1 or t.global_batch_size % mbs:
        raise UserError(f"--gbs {t.global_batch_size} is not a multiple of the micro batch size {mbs}")
    if t.train_steps < 1:
        raise UserError(f"--train-steps {t.train_steps}: give at least 1")
    from qwen_pretrain.training.cli import data_from_args

    return dataclasses.replace(recipe, data=data_from_args(recipe.data, args))


def main(argv: list[str] | None = None) -> int:
    """`python -m qwen_pretrain.benchmarks.reference_trainer ARGS`: the same as `train-reference ARGS`."""
    import sys

    parser = argparse.ArgumentParser(prog="qwen-pretrain")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train-reference", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except UserError as err:
        print(f"qwen-pretrain train-reference: error: {err}", file=sys.stderr)
        return err.exit_code


def run(args: argparse.Namespace) -> int:
    recipe = reference_recipe_from_args(args)
    if args.pad_vocab_as_tp is not None and args.pad_vocab_as_tp < 1:
        raise UserError(f"--pad-vocab-as-tp {args.pad_vocab_as_tp}: give a TP of at least 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train_reference(recipe, ReferenceOptions(
        init=args.init, log_dir=args.log_dir, save=args.save, pad_vocab_as_tp=args.pad_vocab_as_tp,
        threads=args.threads,
    ))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
