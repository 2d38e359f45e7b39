"""The torch_dist checkpoint (`dist_checkpointing`): written part by part, read chunk by chunk.

`<dir>/iter_0000000/` as `dist_checkpointing.save` writes it from the sharded state dict
{"model": GPTModel.sharded_state_dict(), "args", "checkpoint_version", "iteration"}, as
Megatron-LM writes it: `*.distcp` data files, `.metadata` (every global tensor's chunks and where
their bytes are), `metadata.json`, `common.pt`. It is layout independent and resharded at load;
only the embedding's global shape is fixed: `padded_vocab_size(tp)` of the converted TP, so a
loading run must pad the vocabulary the same way (`training.checkpoint_dir.check_torch_dist_tp`).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from qwen_pretrain.conversion.checkpoint_info import CHECKPOINT_VERSION
from qwen_pretrain.conversion.layout import RankCoord
from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.schema import ModelShape
from qwen_pretrain.training.checkpoint_dir import torch_dist_padded_vocab


def meta_model(shape: ModelShape) -> Any:
    """A TP=1 GPTModel on the meta device: its sharded state dict names every global tensor.

    The same on every host: megatron-core's local spec (whose checkpoint names are the TE
    spec's), in a one-process CPU world, nothing allocated; a GPU host with Transformer Engine
    plans exactly as a CPU machine does (TE's layers would pin their weights to host memory).
    """
    from megatron.core import parallel_state as ps
    from qwen_pretrain.training.model import build_tp1_model
    from qwen_pretrain.training.parallel import init_single_process

    if not ps.model_parallel_is_initialized():
        init_single_process(device="cpu")
    return build_tp1_model(shape, meta=True)


# ---------------------------------------------------------------- write


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

    model = meta_model(shape)
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


# ---------------------------------------------------------------- read


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
    sharded = meta_model(load_shape).sharded_state_dict()
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
