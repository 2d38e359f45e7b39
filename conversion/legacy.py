"""The legacy Megatron checkpoint: one `torch.save` file per model-parallel rank.

As Megatron-LM's `get_checkpoint_name` names it (megatron/training/checkpointing.py):

    <dir>/latest_checkpointed_iteration.txt              "0"
    <dir>/iter_0000000/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt
        {"model": state_dict} ("model0", "model1", ... with virtual pipeline stages),
        "checkpoint_version": 3.0, "iteration": 0, "args": argparse.Namespace(...)

`_PPP` appears when PP > 1, `_EEE` when EP > 1. Megatron-LM / MindSpeed-LLM load it with
`--load <dir> --no-load-optim --no-load-rng` (or `--finetune`); their loader tells the format
from the files. The state dicts' names depend on the layer spec and expert layout
(`conversion/mapping.py`).

Targets (`convert hf-to-mcore --target`): what the loading program needs beyond that layout.
`megatron` (Megatron-LM core_v0.16) is the layout above at iteration 0. `mindspeed` is what
MindSpeed-LLM 2.3.0's own converter writes (`convert_ckpt.py` -> mindspeed_llm/tasks/checkpoint/
saver.py, which builds the model MindSpeed-LLM trains and saves it with Megatron-LM's
`save_checkpoint`, ckpt format torch): iteration 1 (MindSpeed-LLM runs Megatron-LM core_v0.12.1,
whose `read_metadata` refuses a tracker file of 0; models.py sets 1: "'0', 'release' don't
work"), the names of the model its `--spec` builds (`mindspeed_layout`) and its tokenizer type.
"""

from __future__ import annotations

import argparse
import functools
import mmap
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_pretrain.conversion.checkpoint_info import CHECKPOINT_VERSION
from qwen_pretrain.conversion.hf_io import copy_file_bytes
from qwen_pretrain.conversion.layout import McoreLayout, RankCoord
from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.schema import ModelShape


@dataclass(frozen=True)
class LegacyTarget:
    """What the program that loads a legacy checkpoint requires beyond Megatron-LM's layout."""

    iteration: int  # the tracker file's number, iter_NNNNNNN and the state's "iteration"
    tokenizer_type: str  # recorded in args (what a run with --use-checkpoint-args takes)


LEGACY_TARGETS = {
    "megatron": LegacyTarget(iteration=0, tokenizer_type="HuggingFaceTokenizer"),
    "mindspeed": LegacyTarget(iteration=1, tokenizer_type="PretrainedFromHF"),
}

# MindSpeed-LLM 2.3.0's layer spec per family, as its Qwen scripts pass it (`--spec MODULE FUNC`).
# qwen3_spec (mindspeed_llm/tasks/models/spec/qwen3_spec.py) is Megatron's local layer: its own
# RMSNorm as input_layernorm / pre_mlp_layernorm / q_layernorm / k_layernorm, ColumnParallelLinear
# linear_qkv, experts from `_get_mlp_module_spec(use_te=False, ...)`. Qwen2/2.5 scripts pass no
# spec: the default Transformer Engine spec, whose modules MindSpeed replaces with its own of the
# same names (layer norms inside linear_qkv / linear_fc1).
MINDSPEED_SPECS = {
    "qwen3": ("mindspeed_llm.tasks.models.spec.qwen3_spec", "layer_spec"),
    "qwen3_moe": ("mindspeed_llm.tasks.models.spec.qwen3_spec", "layer_spec"),
}


def mindspeed_layout(shape: ModelShape) -> tuple[str, str]:
    """(layer spec, expert layout) of the names MindSpeed-LLM's model has for this family, with
    `--moe-grouped-gemm` as its MoE scripts (and our renderer) pass it: Megatron's GroupedMLP
    (`experts.weight1/weight2`) under local layers."""
    layer_spec = "local" if shape.family in MINDSPEED_SPECS else "te"
    return layer_spec, ("legacy_grouped" if shape.is_moe else "sequential")


def legacy_rank_dir(layout: McoreLayout, tp_rank: int, pp_rank: int, ep_rank: int) -> str:
    """Megatron-LM's `get_checkpoint_name` directory for one (TP, PP, EP) rank."""
    name = f"mp_rank_{tp_rank:02d}"
    if layout.pp > 1:
        name += f"_{pp_rank:03d}"
    if layout.ep > 1:
        name += f"_{ep_rank:03d}"
    return name


class LegacyWriter:
    """Legacy rank files written tensor by tensor, so memory holds one tensor, not one stage.

    Two passes over the same plan. `__init__` takes every (rank, name, tensor-or-None) with
    meta-device tensors (shapes and dtypes only) and writes each rank file with `torch.save`
    under `torch.serialization.skip_data`: the pickle and zip headers are complete and each
    tensor's bytes are a sparse hole at a known record offset. `write` then puts the bytes of
    one tensor at its offset. The files load with any `torch.load` (the data records' CRC-32
    fields are 0, which torch does not check; `unzip -t` would complain).
    """

    def __init__(
        self,
        iter_dir: Path,
        layout: McoreLayout,
        planned: Iterator[tuple[RankCoord, str, Any]],
        args: argparse.Namespace,
        iteration: int = 0,
    ) -> None:
        import torch

        files: dict[tuple[int, int, int], dict[str, dict[str, Any]]] = {}
        for rank, name, meta in planned:
            key = (rank.tp_rank, rank.pp_rank, rank.ep_rank)
            model_key = "model" if layout.vpp is None else f"model{rank.vpp_rank}"
            files.setdefault(key, {}).setdefault(model_key, {})[name] = meta
        self._where: dict[tuple[tuple[int, int, int], str, str], tuple[Path, int, int]] = {}
        for key, metas in sorted(files.items()):
            rank_dir = iter_dir / legacy_rank_dir(layout, *key)
            rank_dir.mkdir(parents=True, exist_ok=True)
            path = rank_dir / "model_optim_rng.pt"
            # Uninitialised CPU tensors stand in for the data: skip_data never reads them, and
            # memory never touched is address space only (it does not count in RSS).
            models = {
                mk: {n: None if m is None else torch.empty(m.shape, dtype=m.dtype) for n, m in state.items()}
                for mk, state in metas.items()
            }
            payload = {**models, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, "args": args}
            with torch.serialization.skip_data():
                torch.save(payload, path)
            del payload, models
            self._locate(path, key, metas)
        self._fds: dict[Path, int] = {}

    def _locate(self, path: Path, key: tuple[int, int, int], models: dict[str, dict[str, Any]]) -> None:
        """`models`: the meta tensors (or None) of the file, in the order they were saved."""
        # torch.save numbers storages in pickling order
        import zipfile

        import torch

        reader = torch._C.PyTorchFileReader(str(path))
        with zipfile.ZipFile(path) as z:
            sizes = {i.filename.split("/", 1)[1]: i.file_size for i in z.infolist()}
        index = 0
        for model_key, state in models.items():
            for name, fake in state.items():
                if fake is None:
                    continue
                record = f"data/{index}"
                nbytes = fake.numel() * fake.element_size()
                if sizes.get(record) != nbytes:
                    raise RuntimeError(f"internal: {path} record {record} is not '{name}' ({sizes.get(record)} != {nbytes} bytes)")
                self._where[(key, model_key, name)] = (path, reader.get_record_offset(record), nbytes)
                index += 1

    def write(self, rank: RankCoord, name: str, pieces: list[Any], vpp: bool,
              locate: Callable[[Any], tuple[int, int] | None] | None = None) -> None:
        """Put one tensor in place, given as contiguous pieces whose bytes follow each other.

        A piece that `locate` finds in a source file (fd, offset) is copied file to file by the
        kernel (`copy_file_bytes`): its bytes never pass through this process. Others are written
        from memory.
        """
        import torch

        key = (rank.tp_rank, rank.pp_rank, rank.ep_rank)
        path, offset, nbytes = self._where.pop((key, f"model{rank.vpp_rank}" if vpp else "model", name))
        pieces = [p for p in pieces if p.numel()]
        total = sum(p.numel() * p.element_size() for p in pieces)
        if total != nbytes:
            raise RuntimeError(f"internal: '{name}' has {total} bytes, its record {nbytes}")
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_WRONLY)
        fd = self._fds[path]
        for piece in pieces:
            size = piece.numel() * piece.element_size()
            where = locate(piece) if locate is not None else None
            if where is not None:
                copy_file_bytes(where[0], fd, size, where[1], offset)
            else:
                view = memoryview(piece.contiguous().reshape(-1).view(torch.uint8).numpy())
                done = 0
                while done < size:  # one pwrite moves at most ~2 GB on Linux: loop
                    done += os.pwrite(fd, view[done:], offset + done)
            offset += size

    @property
    def pending(self) -> int:
        """Tensors planned and not written yet."""
        return len(self._where)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def check_complete(self) -> None:
        if self._where:
            (key, _, name), _ = next(iter(self._where.items()))
            raise RuntimeError(f"internal: tensor '{name}' of rank {key} was planned but never written")


def legacy_layout(iter_dir: Path) -> tuple[McoreLayout, argparse.Namespace]:
    """The layout a legacy checkpoint was written with, from its `args` and directory names."""
    import torch

    files = sorted(iter_dir.glob("mp_rank_*/model_optim_rng.pt"))
    if not files:
        raise UserError(f"{iter_dir}: no mp_rank_*/model_optim_rng.pt files")
    first = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    args = first.get("args")
    if args is None:
        raise UserError(f"{files[0]}: has no 'args'; cannot tell its TP/PP/EP layout")
    expert_layout = "sequential"
    model = first.get("model") or first.get("model0") or {}
    if any(k.endswith("mlp.experts.weight1") for k in model):
        expert_layout = "legacy_grouped"
    elif any(re.search(r"mlp\.experts\.linear_fc1\.weight\d+$", k) for k in model):
        expert_layout = "te_grouped"
    layer_spec = "te" if any(k.endswith("layer_norm_weight") for k in model) else "local"
    layout = McoreLayout(
        tp=args.tensor_model_parallel_size,
        pp=args.pipeline_model_parallel_size,
        ep=getattr(args, "expert_model_parallel_size", 1) or 1,
        vpp=getattr(args, "virtual_pipeline_model_parallel_size", None),
        etp=getattr(args, "expert_tensor_parallel_size", 1) or 1,
        layer_spec=layer_spec,
        expert_layout=expert_layout,
    )
    return layout, args


class LegacyRankFiles:
    """get(rank, name) over memory-mapped rank files (pages are read on demand); `release()`
    drops the pages of every tensor got so far from RSS (they are re-read if used again)."""

    def __init__(self, iter_dir: Path, layout: McoreLayout) -> None:
        self.iter_dir, self.layout = iter_dir, layout
        self.loaded: dict[tuple[int, int, int], dict[str, Any]] = {}
        self.touched: list[tuple[int, int]] = []  # (address, bytes) of tensors handed out

    def __call__(self, rank: RankCoord, name: str) -> Any:
        import torch

        key = (rank.tp_rank, rank.pp_rank, rank.ep_rank)
        if key not in self.loaded:
            path = self.iter_dir / legacy_rank_dir(self.layout, *key) / "model_optim_rng.pt"
            if not path.is_file():
                raise UserError(f"{path}: missing; the checkpoint's rank files are incomplete")
            self.loaded[key] = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        model_key = "model" if self.layout.vpp is None else f"model{rank.vpp_rank}"
        state = self.loaded[key][model_key]
        if name not in state:
            raise UserError(f"{self.iter_dir / legacy_rank_dir(self.layout, *key)}: tensor '{name}' is missing")
        t = state[name]
        self.touched.append((t.data_ptr(), t.numel() * t.element_size()))
        return t

    def release(self) -> None:
        """MADV_DONTNEED over the handed-out tensors' pages (torch maps the files privately and
        read-only use never dirties them, so nothing is lost)."""
        import ctypes

        libc = _libc()
        page = mmap.PAGESIZE
        for address, nbytes in self.touched:
            first = address - address % page
            last = address + nbytes
            last = last - last % page  # only whole pages of this tensor: a neighbour may share the edges
            if last > first:
                libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)
        self.touched.clear()


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def legacy_reader(iter_dir: Path, layout: McoreLayout) -> LegacyRankFiles:
    """get(rank, name) over the memory-mapped rank files of a legacy checkpoint."""
    return LegacyRankFiles(iter_dir, layout)
