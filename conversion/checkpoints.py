"""Megatron checkpoint formats: legacy per-rank files and torch_dist (`dist_checkpointing`).

Legacy, as Megatron-LM's `get_checkpoint_name` names it (megatron/training/checkpointing.py):

    <dir>/latest_checkpointed_iteration.txt              "0"
    <dir>/iter_0000000/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt
        {"model": state_dict} ("model0", "model1", ... with virtual pipeline stages),
        "checkpoint_version": 3.0, "iteration": 0, "args": argparse.Namespace(...)

`_PPP` appears when PP > 1, `_EEE` when EP > 1. Megatron-LM / MindSpeed-LLM load it with
`--load <dir> --no-load-optim --no-load-rng` (or `--finetune`) and `--ckpt-format torch`.

torch_dist: `<dir>/iter_0000000/` written by `dist_checkpointing.save` from the sharded state dict
{"model": GPTModel.sharded_state_dict(), "args", "checkpoint_version", "iteration"}, as
Megatron-LM writes it; it is layout independent and resharded at load (the embedding's global
shape is `padded_vocab_size(tp)` of the converted TP, so a loading run must pad the vocabulary the
same way).

Both carry `conversion.json` (shape, layout, format) and `hf/` (the original config.json and
tokenizer files) so that `mcore-to-hf` needs no options.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import math
import mmap
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from qwen_pretrain.conversion.hf_io import copy_file_bytes
from qwen_pretrain.conversion.mapping import McoreLayout, RankCoord
from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.schema import ModelShape
from qwen_pretrain.training.checkpoint_dir import (  # noqa: F401  (the converters' names for them)
    TRACKER_FILE,
    check_torch_dist_tp,
    iter_dir_name,
    loadable_tps,
    read_tracker,
    torch_dist_padded_vocab,
)

CHECKPOINT_VERSION = 3.0
CONVERSION_INFO = "conversion.json"


def legacy_rank_dir(layout: McoreLayout, tp_rank: int, pp_rank: int, ep_rank: int) -> str:
    """Megatron-LM's `get_checkpoint_name` directory for one (TP, PP, EP) rank."""
    name = f"mp_rank_{tp_rank:02d}"
    if layout.pp > 1:
        name += f"_{pp_rank:03d}"
    if layout.ep > 1:
        name += f"_{ep_rank:03d}"
    return name


def megatron_args(shape: ModelShape, layout: McoreLayout, dtype: str) -> argparse.Namespace:
    """The `args` Megatron-LM's loader reads back (check_checkpoint_args and friends)."""
    return argparse.Namespace(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        group_query_attention=shape.num_query_groups != shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        position_embedding_type="rope",
        add_position_embedding=False,
        rotary_base=int(shape.rope_theta),
        normalization="RMSNorm",
        norm_epsilon=shape.rms_norm_eps,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_norm,
        untie_embeddings_and_output_weights=not shape.tie_embeddings,
        make_vocab_size_divisible_by=shape.make_vocab_size_divisible_by,
        padded_vocab_size=shape.padded_vocab_size(layout.tp),
        tokenizer_type="HuggingFaceTokenizer",
        num_experts=shape.num_experts,
        moe_ffn_hidden_size=shape.moe_ffn_hidden_size,
        moe_router_topk=shape.moe_router_topk,
        moe_grouped_gemm=layout.expert_layout != "sequential",
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        ckpt_format="torch",
        iteration=0,
        consumed_train_samples=0,
        consumed_valid_samples=0,
    )


def write_info(out: Path, fmt: str, shape: ModelShape, layout: McoreLayout, recipe: str | None, dtype: str) -> None:
    info = {
        "format": fmt,
        "recipe": recipe,
        "dtype": dtype,
        "shape": dataclasses.asdict(shape),
        "layout": dataclasses.asdict(layout),
        "iteration": 0,
    }
    (out / CONVERSION_INFO).write_text(json.dumps(info, indent=2) + "\n")


def read_info(mcore_dir: Path) -> dict[str, Any] | None:
    path = Path(mcore_dir) / CONVERSION_INFO
    return json.loads(path.read_text()) if path.is_file() else None


def detect_format(iter_dir: Path) -> str:
    if (iter_dir / "metadata.json").is_file() or (iter_dir / ".metadata").is_file():
        return "torch_dist"
    if any(iter_dir.glob("mp_rank_*/model_optim_rng.pt")):
        return "legacy"
    raise UserError(f"{iter_dir}: neither a torch_dist nor a legacy (mp_rank_*) checkpoint")


# ---------------------------------------------------------------- legacy


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
            payload = {**models, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0, "args": args}
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


# ---------------------------------------------------------------- torch_dist


def _meta_model(shape: ModelShape) -> Any:
    """A TP=1 GPTModel on the meta device: its sharded state dict names every global tensor."""
    from megatron.core import parallel_state as ps
    from qwen_pretrain.training.model import build_tp1_model
    from qwen_pretrain.training.parallel import init_single_process

    if not ps.model_parallel_is_initialized():
        init_single_process()
    return build_tp1_model(shape, meta=True)


def padded_as(shape: ModelShape, tp: int) -> ModelShape:
    """`shape` whose TP=1 padding equals `shape`'s padding at `tp` (same embedding rows)."""
    return dataclasses.replace(shape, make_vocab_size_divisible_by=shape.make_vocab_size_divisible_by * tp)


LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.")


def _part_of(name: str) -> str:
    """Tensors saved together: one transformer layer, or one tensor outside the layers."""
    m = LAYER_KEY.match(name)
    return f"layer {m.group(1)}" if m else name


def save_torch_dist(
    iter_dir: Path, shape: ModelShape, tensors: Iterable[tuple[str, Any]], args: argparse.Namespace,
    part_done: Callable[[], None] | None = None,
) -> None:
    """Write `tensors` (the TP=1 state dict, mapped at tp=1 with `shape`'s padding, as a stream
    of (name, tensor)) as one torch_dist checkpoint, holding one part in memory at a time.

    megatron-core's `dist_checkpointing.save` takes one sharded state dict, i.e. the whole model.
    So each part (a transformer layer, or a tensor outside the layers) is saved on its own, as
    soon as its last tensor arrives, into a directory of its own; `_merge_torch_dist_parts` then
    joins the parts into one checkpoint: their data files moved side by side and one `.metadata`
    listing every chunk. The bytes of each tensor are megatron-core's own; only the index is
    ours, and it is checked to cover every global tensor exactly once. `part_done()` is called
    after each part is written (the reader drops what it read for it).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, apply_factories

    model = _meta_model(shape)
    plan, objects = {}, {}  # tensors to fill in; the rest (`_extra_state` objects) as they are
    for name, entry in model.sharded_state_dict().items():
        if isinstance(entry, ShardedTensor | ShardedTensorFactory):
            plan[name] = entry
        else:
            objects.setdefault(_part_of(name), {})[name] = entry
    waiting: dict[str, set[str]] = {}
    for name in plan:
        waiting.setdefault(_part_of(name), set()).add(name)
    common = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}
    iter_dir.mkdir(parents=True, exist_ok=True)
    parts: list[TorchDistPart] = []

    def save_part(state: dict[str, Any], layer: int, stacked: set[str]) -> None:
        part_dir = iter_dir / f".part{len(parts):05d}"
        part_dir.mkdir()
        dist_checkpointing.save({"model": state, **common}, str(part_dir), validate_access_integrity=False)
        parts.append(TorchDistPart(part_dir, layer, shape.num_layers, frozenset(stacked)))

    held: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors:
        entry = plan.pop(name, None)  # popped: once its part is saved, nothing holds the tensor
        if entry is None:
            continue  # not a tensor of this model at TP=1 (nothing to save)
        entry.data = tensor
        if isinstance(entry, ShardedTensor):
            entry.dtype = tensor.dtype
        part = _part_of(name)
        held.setdefault(part, {})[name] = entry
        waiting[part].discard(name)
        if waiting[part]:
            continue
        state = held.pop(part) | objects.pop(part, {})
        apply_factories(state)  # e.g. SwiGLU fc1 -> its gate and up halves
        m = LAYER_KEY.match(name)
        layer = None if m is None else int(m.group(1))
        stacked: set[str] = set()
        if layer is not None:
            # megatron-core turns each stacked key into a torch ShardedTensor that must hold every
            # layer's shard in a one-process save; so the part saves its layer as a stack of one,
            # and the merge puts it back at its depth.
            one_layer = _one_layer_stack(layer, shape.num_layers, stacked)
            dict_list_map_inplace(one_layer, state)
        save_part(state, layer or 0, stacked)
        del state
        del waiting[part]
        if part_done is not None:
            part_done()
    if waiting:
        missing = sorted(n for names in waiting.values() for n in names)
        raise UserError(f"internal: tensor '{missing[0]}' was not converted")
    if objects:  # objects of parts that have no tensor
        save_part({name: obj for group in objects.values() for name, obj in group.items()}, 0, set())
    _merge_torch_dist_parts(iter_dir, parts)


def _one_layer_stack(layer: int, num_layers: int, stacked: set[str]) -> Callable[[Any], Any]:
    """A map over a part's sharded dict: layer `layer` of each stacked ShardedTensor becomes a
    stack of one (its key is added to `stacked`); anything else is left as it is."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    def one_layer(x: Any) -> Any:
        if not isinstance(x, ShardedTensor):
            return x
        if x.global_shape[0] != num_layers or x.global_offset[0] != layer:
            raise RuntimeError(f"internal: '{x.key}' is not stacked by layer ({x.global_shape}, {x.global_offset})")
        stacked.add(x.key)
        frag = x.axis_fragmentations
        return dataclasses.replace(
            x, global_shape=(1, *x.global_shape[1:]), global_offset=(0, *x.global_offset[1:]),
            axis_fragmentations=None if frag is None else (1, *frag[1:]),
        )  # fmt: skip

    return one_layer


@dataclasses.dataclass(frozen=True)
class TorchDistPart:
    """One part checkpoint: where it is, and which of its keys are one layer of a layer stack."""

    path: Path
    layer: int
    num_layers: int
    stacked: frozenset[str]


def _merge_torch_dist_parts(iter_dir: Path, parts: list[TorchDistPart]) -> None:
    """One torch_dist checkpoint in `iter_dir` from the part checkpoints `parts` (then removed)."""
    import pickle
    import shutil

    import torch
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

    merged: Metadata | None = None
    n_files = 0
    for p in parts:
        part = p.path
        with open(part / ".metadata", "rb") as f:
            meta = pickle.load(f)
        for key in p.stacked:  # a stack of one layer -> that layer of the full stack
            item = meta.state_dict_metadata[key]
            item.size = torch.Size((p.num_layers, *item.size[1:]))
            for chunk in item.chunks:
                chunk.offsets = torch.Size((chunk.offsets[0] + p.layer, *chunk.offsets[1:]))
        meta.storage_data = {
            MetadataIndex(i.fqn, torch.Size((i.offset[0] + p.layer, *i.offset[1:])), i.index)
            if i.fqn in p.stacked else i: info
            for i, info in meta.storage_data.items()
        }  # fmt: skip
        renamed = {}
        for old in sorted({info.relative_path for info in meta.storage_data.values()}):
            renamed[old] = f"__0_{n_files}.distcp"
            os.rename(part / old, iter_dir / renamed[old])
            n_files += 1
        for info in meta.storage_data.values():
            info.relative_path = renamed[info.relative_path]
        if merged is None:
            merged = meta
            for name in ("common.pt", "metadata.json"):
                os.rename(part / name, iter_dir / name)
        else:
            for key, item in meta.state_dict_metadata.items():
                have = merged.state_dict_metadata.get(key)
                if have is None:
                    merged.state_dict_metadata[key] = item
                elif isinstance(item, TensorStorageMetadata) and isinstance(have, TensorStorageMetadata):
                    if (have.size, have.properties.dtype) != (item.size, item.properties.dtype):
                        raise RuntimeError(f"internal: parts disagree on '{key}': {have.size} vs {item.size}")
                    have.chunks.extend(item.chunks)
                else:
                    raise RuntimeError(f"internal: '{key}' saved by two parts")
            merged.storage_data.update(meta.storage_data)
            if isinstance(merged.planner_data, dict) and isinstance(meta.planner_data, dict):
                merged.planner_data.update(meta.planner_data)
        shutil.rmtree(part)
    if merged is None:
        raise RuntimeError("internal: no tensors to save")
    for key, item in merged.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            item.chunks.sort(key=lambda c: tuple(c.offsets))
            covered = sum(math.prod(c.sizes) for c in item.chunks)
            if covered != math.prod(item.size) or len({tuple(c.offsets) for c in item.chunks}) != len(item.chunks):
                raise RuntimeError(f"internal: the saved chunks of '{key}' do not cover it exactly once")
    merged.storage_meta = None  # it named the first part's directory
    tmp = iter_dir / ".metadata.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(merged, f)
    os.rename(tmp, iter_dir / ".metadata")


class _FileWindow(io.RawIOBase):
    """`length` bytes of an open file from `start`, as a file of their own (for torch.load)."""

    def __init__(self, f: Any, start: int, length: int) -> None:
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, min(self.length, base + offset))
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[: max(0, self.length - self.pos)]
        n = os.preadv(self.f.fileno(), [view], self.start + self.pos) if len(view) else 0
        self.pos += n
        return n


class TorchDistChunks:
    """Regions of the global tensors of a torch_dist checkpoint, read chunk by chunk.

    `.metadata` lists, for every global tensor, the chunks it was saved in and where each one's
    bytes are. A region (one layer of a layer stack, say) is assembled from the chunks that
    overlap it, each read on its own: memory holds the region and one chunk, whatever layout
    (TP, PP, EP) wrote the checkpoint.
    """

    def __init__(self, iter_dir: Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.dir = Path(iter_dir)
        meta = FileSystemReader(str(iter_dir)).read_metadata()
        self.tensors = meta.state_dict_metadata
        self.storage = meta.storage_data
        self._files: dict[str, Any] = {}

    def _chunk(self, key: str, chunk: Any) -> Any:
        import torch
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.storage[MetadataIndex(key, chunk.offsets)]
        if getattr(info, "transform_descriptors", None):
            raise UserError(f"{self.dir}: '{key}' is stored with transforms {info.transform_descriptors}, which this reader does not undo")
        f = self._files.get(info.relative_path)
        if f is None:
            f = self._files[info.relative_path] = open(self.dir / info.relative_path, "rb")  # noqa: SIM115
        window = _FileWindow(f, info.offset, info.length)
        head = window.read(4)
        window.seek(0)
        if head[:2] == b"PK":  # torch.save of the chunk (the default serialization)
            return torch.load(io.BufferedReader(window), weights_only=True)
        dtype = self.tensors[key].properties.dtype
        data = torch.empty(info.length, dtype=torch.uint8)
        window.readinto(data.numpy())
        return data.view(dtype).reshape(chunk.sizes)

    def read(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> Any:
        """The region of global tensor `key` at `offset` of `shape`."""
        import torch

        item = self.tensors.get(key)
        if item is None or not hasattr(item, "chunks"):
            raise UserError(f"{self.dir}: tensor '{key}' is missing from the torch_dist checkpoint")
        for chunk in item.chunks:  # the region is one whole chunk (a TP=1 save): no copy
            if tuple(chunk.offsets) == tuple(offset) and tuple(chunk.sizes) == tuple(shape):
                return self._chunk(key, chunk).reshape(shape)
        out = torch.empty(shape, dtype=item.properties.dtype)
        filled = 0
        for chunk in item.chunks:
            lo = [max(o, c) for o, c in zip(offset, chunk.offsets)]
            hi = [min(o + n, c + m) for o, n, c, m in zip(offset, shape, chunk.offsets, chunk.sizes)]
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            data = self._chunk(key, chunk)
            src = tuple(slice(low - c, h - c) for low, h, c in zip(lo, hi, chunk.offsets))
            dst = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, offset))
            out[dst] = data[src]
            filled += out[dst].numel()
            del data
        if filled != out.numel():
            raise UserError(f"{self.dir}: the chunks of '{key}' do not cover offset {offset}, shape {shape}")
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def torch_dist_reader(iter_dir: Path, shape: ModelShape) -> Callable[[RankCoord, str], Any]:
    """get(rank, name) at TP=1, whatever layout wrote the checkpoint: each tensor read on its own
    from the chunks that hold it (`TorchDistChunks`), so memory holds one tensor, not the model."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    rows, _ = torch_dist_padded_vocab(iter_dir)
    if rows < shape.vocab_size:
        raise UserError(f"{iter_dir}: embedding has {rows} rows, fewer than the vocabulary ({shape.vocab_size})")
    # a divisor of `rows` itself pads the vocabulary to exactly the stored rows at TP=1
    load_shape = dataclasses.replace(shape, make_vocab_size_divisible_by=rows)
    sharded = _meta_model(load_shape).sharded_state_dict()
    chunks = TorchDistChunks(iter_dir)

    def load(x: Any) -> Any:
        if not isinstance(x, ShardedTensor):
            return x
        region = chunks.read(x.key, x.global_offset, (1,) * x.prepend_axis_num + tuple(x.local_shape))
        return region.reshape(x.local_shape)

    def get(rank: RankCoord, name: str) -> Any:
        entry = sharded.get(name)
        if isinstance(entry, ShardedTensor):
            return load(entry)
        if isinstance(entry, ShardedTensorFactory):  # e.g. SwiGLU fc1: gate and up halves, merged
            return entry.merge_fn(dict_list_map_inplace(load, entry.build()))
        raise UserError(f"{iter_dir}: tensor '{name}' is missing from the torch_dist checkpoint")

    return get
