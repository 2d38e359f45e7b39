"""The conversions: HF -> megatron-core, megatron-core -> HF, and numerical verification.

Every output is written into a temporary directory beside `--out` and renamed at the end, so a
failed or interrupted conversion leaves nothing that looks like a checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qwen_pretrain.conversion import hf_io
from qwen_pretrain.conversion.checkpoint_info import (
    CONVERSION_INFO,
    detect_format,
    megatron_args,
    read_info,
    write_info,
)
from qwen_pretrain.conversion.layout import McoreLayout, RankCoord
from qwen_pretrain.conversion.legacy import (
    LEGACY_TARGETS,
    LegacyWriter,
    legacy_layout,
    legacy_reader,
    mindspeed_layout,
)
from qwen_pretrain.conversion.mapping import expected_hf_shapes, hf_tensors_from_mcore, iter_stage_tensors
from qwen_pretrain.conversion.torch_dist import padded_as, save_torch_dist, torch_dist_reader
from qwen_pretrain.recipes import get_recipe
from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.files import atomic_dir
from qwen_pretrain.recipes.schema import ModelShape
from qwen_pretrain.training.checkpoint_dir import (
    TRACKER_FILE,
    iter_dir_name,
    read_tracker,
    torch_dist_padded_vocab,
)

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


@contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """A temporary directory renamed to `out` when the block succeeds, removed when it fails."""
    out = Path(out)
    if out.exists():
        raise UserError(f"--out {out}: already exists; choose a new directory or remove it")
    with atomic_dir(out) as tmp:
        yield tmp


def _progress(total: int, desc: str, quiet: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=quiet or not sys.stderr.isatty())


def _cast(get: Callable[[str], Any], dtype: str | None) -> Callable[[str], Any]:
    if dtype is None:
        return get
    import torch

    target = getattr(torch, DTYPES[dtype])
    return lambda name: get(name).to(target)


def hf_to_mcore(
    hf_dir: Path,
    out: Path,
    *,
    recipe: str | None = None,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    vpp: int | None = None,
    etp: int = 1,
    fmt: str = "torch_dist",
    dtype: str | None = None,
    layer_spec: str = "local",
    expert_layout: str = "sequential",
    quiet: bool = False,
    target: str = "megatron",
) -> Path:
    """Convert a Hugging Face checkpoint into a megatron-core checkpoint at `out`."""
    hf_dir = Path(hf_dir)
    config = hf_io.read_config(hf_dir)
    shape, recipe_name = hf_io.resolve_shape(config, recipe)
    layout = McoreLayout(tp, pp, ep, vpp, etp, layer_spec, expert_layout)  # type: ignore[arg-type]
    layout.validate(shape)
    if target == "mindspeed" and (fmt, (layer_spec, expert_layout)) != ("legacy", mindspeed_layout(shape)):
        spec, experts = mindspeed_layout(shape)
        raise UserError(f"--target mindspeed: MindSpeed-LLM loads {shape.family} as --format legacy, "
                        f"--layer-spec {spec}, --expert-layout {experts}")
    legacy_target = LEGACY_TARGETS[target]
    if fmt not in ("torch_dist", "legacy"):
        raise UserError(f"--format {fmt}: choose torch_dist or legacy")
    if fmt == "torch_dist" and (layer_spec, expert_layout) != ("local", "sequential"):
        raise UserError("--format torch_dist is layout independent: leave --layer-spec/--expert-layout at their defaults")
    reader = hf_io.HFReader(hf_dir)
    check_shapes = expected_hf_shapes(shape)
    hf_io.check_tensor_names(reader, check_shapes, shape.tie_embeddings)
    get = _cast(reader.get, dtype)
    stored_dtype = DTYPES[dtype] if dtype else reader.dtype_of("model.embed_tokens.weight")
    args = megatron_args(shape, layout, stored_dtype)
    args.iteration, args.tokenizer_type = legacy_target.iteration, legacy_target.tokenizer_type
    with atomic_output_dir(out) as tmp:
        iter_dir = tmp / iter_dir_name(legacy_target.iteration)
        if fmt == "legacy":
            # Pass 1 on meta tensors (shapes and dtypes only): every check runs and every rank
            # file gets its skeleton before a byte of data is read. Pass 2 reads each HF tensor
            # once and writes its shards in place: memory holds one item, not one stage.
            ranks = layout.ranks()
            writer = LegacyWriter(iter_dir, layout, iter_stage_tensors(shape, layout, ranks, _cast(reader.meta, dtype)), args,
                                  iteration=legacy_target.iteration)
            bar = _progress(writer.pending, "hf-to-mcore", quiet)
            reader.map_files()  # views of the files: pieces that are plain byte ranges go file to file
            try:
                for rank, name, pieces in iter_stage_tensors(shape, layout, ranks, get, pieces=True, item_done=reader.release):
                    if pieces is not None:
                        writer.write(rank, name, pieces, vpp=layout.vpp is not None, locate=reader.locate)
                        bar.update(1)
            finally:
                reader.close()
                writer.close()
            writer.check_complete()
            bar.close()
        else:
            # The on-disk format is layout independent: convert at TP=1 with the target TP's
            # vocab padding; dist_checkpointing reshards at load.
            # Streamed part by part (a layer at a time), so memory holds one layer, not the model.
            tp1 = padded_as(shape, layout.tp)
            one = McoreLayout()
            reader.map_files()  # tensors passed through unchanged are views: no copy in memory
            tensors = ((name, t) for _, name, t in iter_stage_tensors(tp1, one, one.ranks(), get) if t is not None)
            try:
                save_torch_dist(iter_dir, tp1, tensors, args, part_done=reader.release)
            finally:
                reader.close()
        (tmp / TRACKER_FILE).write_text(f"{legacy_target.iteration}\n")
        write_info(tmp, fmt, shape, layout, recipe_name, stored_dtype)
        hf_io.copy_hf_assets(hf_dir, tmp / "hf")
    return Path(out)


def _shape_for_mcore(mcore_dir: Path, recipe: str | None) -> tuple[ModelShape, dict[str, Any] | None]:
    info = read_info(mcore_dir)
    if recipe is not None:
        shape = get_recipe(recipe).model
        if info is not None:
            saved = ModelShape(**info["shape"])
            for f in hf_io.STRUCTURAL_FIELDS:
                if getattr(saved, f) != getattr(shape, f):
                    raise UserError(
                        f"--recipe {recipe}: {f} is {getattr(shape, f)} but the checkpoint was converted with {getattr(saved, f)}"
                    )
        return shape, info
    if info is None:
        raise UserError(f"{mcore_dir}: no {CONVERSION_INFO}; name the model with --recipe")
    return ModelShape(**info["shape"]), info


def open_mcore(mcore_dir: Path, recipe: str | None) -> tuple[ModelShape, McoreLayout, Callable[[RankCoord, str], Any], str]:
    """(shape, layout to read with, get(rank, name), format) of a megatron-core checkpoint."""
    mcore_dir = Path(mcore_dir)
    iter_dir = read_tracker(mcore_dir)
    fmt = detect_format(iter_dir)
    shape, _ = _shape_for_mcore(mcore_dir, recipe)
    if fmt == "legacy":
        layout, _ = legacy_layout(iter_dir)
        layout.validate(shape)
        return shape, layout, legacy_reader(iter_dir, layout), fmt
    return shape, McoreLayout(), torch_dist_reader(iter_dir, shape), fmt


def mcore_to_hf(mcore_dir: Path, out: Path, *, recipe: str | None = None, max_shard_bytes: int = 2 * 1024**3, quiet: bool = False) -> Path:
    """Gather a megatron-core checkpoint (any layout, either format) into HF safetensors."""
    import json

    mcore_dir = Path(mcore_dir)
    shape, layout, get, _ = open_mcore(mcore_dir, recipe)
    n = len(expected_hf_shapes(shape))
    with atomic_output_dir(out) as tmp:
        bar = _progress(n, "mcore-to-hf", quiet)

        release = getattr(get, "release", None)  # legacy rank files: drop mapped pages as we go

        def tensors() -> Iterator[tuple[str, Any]]:
            for name, t in hf_tensors_from_mcore(shape, get, layout):
                bar.update(1)
                yield name, t  # back here once the writer has written it
                del t
                if release is not None:
                    release()

        hf_io.write_safetensors_shards(tmp, tensors(), max_shard_bytes, names=expected_hf_shapes(shape))
        bar.close()
        assets = mcore_dir / "hf"
        if assets.is_dir():
            hf_io.copy_hf_assets(assets, tmp)
        if not (tmp / "config.json").is_file():
            (tmp / "config.json").write_text(json.dumps(hf_io.hf_config_for(shape), indent=2) + "\n")
    return Path(out)


# ---------------------------------------------------------------- verify


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    max_abs_diff: float
    top1_agreement: float
    prompts: int
    tokens: int

    def ok(self, tolerance: float) -> bool:
        return self.max_abs_diff <= tolerance and self.top1_agreement == 1.0


PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "Megatron-core shards a transformer over tensor, pipeline and expert parallel ranks.",
    "量子计算的基本单位是",
)


def _prompt_ids(hf_dir: Path, vocab: int) -> list[list[int]]:
    tok = Path(hf_dir) / "tokenizer.json"
    if tok.is_file():
        from tokenizers import Tokenizer

        t = Tokenizer.from_file(str(tok))
        return [[i % vocab for i in t.encode(p).ids] for p in PROMPTS]
    import random

    rng = random.Random(0)  # no tokenizer shipped: fixed pseudo-random token ids
    return [[rng.randrange(vocab) for _ in range(12)] for _ in PROMPTS]


def load_mcore_model_tp1(
    mcore_dir: Path, shape: ModelShape, fmt: str, get: Callable[[RankCoord, str], Any], layout: McoreLayout,
    device: str = "cpu",
) -> Any:
    """The checkpoint in a TP=1 megatron-core GPTModel (local spec, fp32) on `device`, built by the
    trainer's builder: the same model on every host, whatever it has installed."""
    from megatron.core import dist_checkpointing
    from qwen_pretrain.conversion.mapping import mcore_state_dict_from_hf
    from qwen_pretrain.training.model import build_tp1_model
    from qwen_pretrain.training.parallel import init_single_process

    iter_dir = read_tracker(mcore_dir)
    if fmt == "torch_dist":
        rows, _ = torch_dist_padded_vocab(iter_dir)
        load_shape = dataclasses.replace(shape, make_vocab_size_divisible_by=rows)
    else:
        load_shape = shape
    init_single_process(device=device)
    model = build_tp1_model(load_shape, device=device).eval()
    if fmt == "torch_dist":
        # the real loader: dist_checkpointing reshards whatever TP/PP/EP was saved to TP=1
        sharded = model.sharded_state_dict()
        loaded = dist_checkpointing.load({"model": sharded}, str(iter_dir))["model"]
        model.load_state_dict({k: v.float() if hasattr(v, "float") else v for k, v in loaded.items()})
    else:
        hf = dict(hf_tensors_from_mcore(shape, get, layout))
        # the local spec's names: the model above is always the local spec
        state = mcore_state_dict_from_hf(shape, lambda n: hf[n].float())
        model.load_state_dict(state)
    return model.float()


def verify(hf_dir: Path, mcore_dir: Path, *, recipe: str | None = None, device: str = "cpu") -> VerifyResult:
    """Logits of the HF model (transformers) and the megatron-core model (local spec) on a few
    prompts, fp32, both on `device` with their inputs."""
    import torch
    import transformers

    shape, layout, get, fmt = open_mcore(Path(mcore_dir), recipe)
    model = load_mcore_model_tp1(Path(mcore_dir), shape, fmt, get, layout, device=device)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).to(device).eval()
    max_diff, agree, total = 0.0, 0, 0
    with torch.no_grad():
        for ids in _prompt_ids(Path(hf_dir), shape.vocab_size):
            x = torch.tensor([ids], device=device)
            ref = hf_model(x).logits[0]
            pos = torch.arange(len(ids), device=device).unsqueeze(0)
            out = model(x, pos, None)[0, :, : shape.vocab_size]
            max_diff = max(max_diff, (ref - out).abs().max().item())
            agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
            total += len(ids)
    return VerifyResult(max_diff, agree / total, len(PROMPTS), total)
