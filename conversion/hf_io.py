"""Hugging Face checkpoints: architecture detection, recipe matching, lazy reading, sharded writing.

Reading goes tensor by tensor, either with positional reads of the safetensors files, or (for
writers that can have the kernel copy bytes file to file) as views of a memory map that are never
touched; writing streams tensors into shards of at most `max_shard_bytes`, with
`model.safetensors.index.json`, into a temporary directory that is renamed at the end.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import mmap
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from qwen_pretrain.conversion.families import ARCHITECTURES, ModelFamily, family_named
from qwen_pretrain.recipes import all_recipes, get_recipe
from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.schema import ModelShape

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
# The fields that decide the tensors' names and shapes: a recipe matches a config.json when
# all of them agree.
STRUCTURAL_FIELDS = (
    "family",
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "num_query_groups",
    "head_dim",
    "ffn_hidden_size",
    "vocab_size",
    "tie_embeddings",
    "qkv_bias",
    "qk_norm",
    "num_experts",
    "moe_ffn_hidden_size",
)


def read_config(hf_dir: Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: not found; --hf must be a Hugging Face model directory with config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from err


def family_of(config: dict[str, Any], where: str = "config.json") -> ModelFamily:
    """The family of config.json's architecture (`families.FAMILIES`)."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else config.get("model_type", "<none>")
    if arch not in ARCHITECTURES:
        raise UserError(
            f"{where}: architecture '{arch}' is not supported: this converter handles "
            f"{', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[arch]


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    """A ModelShape built from config.json (used for shapes no recipe knows)."""
    family = family_of(config)
    rope = config.get("rope_parameters") or {}
    heads = config["num_attention_heads"]
    moe = family.moe
    return ModelShape(
        family=family.name,
        hf_architecture=config["architectures"][0],
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads", heads),
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        ffn_hidden_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias,
        qk_norm=family.qk_norm,
        max_position_embeddings=config.get("max_position_embeddings", 32768),
        rope_theta=float(config.get("rope_theta", rope.get("rope_theta", 1_000_000.0))),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        num_experts=(config.get("num_experts") or config.get("num_local_experts")) if moe else None,
        moe_ffn_hidden_size=config.get("moe_intermediate_size") if moe else None,
        moe_router_topk=config.get("num_experts_per_tok", 0) if moe else 0,
        moe_norm_topk_prob=bool(config.get("norm_topk_prob", False)) if moe else False,
        moe_aux_loss_coeff=config.get("router_aux_loss_coef", 0.0) if moe else 0.0,
    )


def _structure(shape: ModelShape) -> dict[str, Any]:
    return {f: getattr(shape, f) for f in STRUCTURAL_FIELDS}


def resolve_shape(config: dict[str, Any], recipe: str | None) -> tuple[ModelShape, str | None]:
    """The recipe's shape (named, or matched from config.json), else one built from config.json.

    The recipe stays the source of truth for known models; a named recipe that disagrees with
    config.json is refused, naming the first field that differs.
    """
    found = shape_from_config(config)
    if recipe is not None:
        shape = get_recipe(recipe).model
        for f, v in _structure(found).items():
            if getattr(shape, f) != v:
                raise UserError(
                    f"config.json does not match recipe '{recipe}': {f} is {v} in config.json but "
                    f"{getattr(shape, f)} in the recipe; pick the right --recipe or leave it out"
                )
        return shape, get_recipe(recipe).name
    for r in all_recipes():
        if _structure(r.model) == _structure(found):
            return r.model, r.name
    return found, None


# safetensors dtype names -> torch dtype names
SAFETENSORS_DTYPES = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
SAFETENSORS_NAME = {torch_name: st for st, torch_name in SAFETENSORS_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file (from the file's JSON header)."""

    file: str
    dtype: str  # torch dtype name
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file: 8-byte little-endian header size, JSON header, data."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise UserError(f"{path}: not a safetensors file (shorter than its header)")
        size = int.from_bytes(head, "little")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: not a safetensors file (bad header: {err})") from err
    base = 8 + size
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor '{name}' has dtype {meta['dtype']}, which this converter does not read")
        begin, stop = meta["data_offsets"]
        entries[name] = TensorEntry(path.name, SAFETENSORS_DTYPES[meta["dtype"]], tuple(meta["shape"]), base + begin, stop - begin)
    return entries


class HFReader:
    """Tensors of a Hugging Face safetensors checkpoint (one or many shards), one at a time.

    By default each tensor is read with positional reads into its own buffer: the bytes are read
    once, and the file's pages stay in the page cache instead of this process's RSS. After
    `map_files()`, `get` returns views of a private memory map instead, and `locate` says where
    a view's bytes lie in its file (see there).
    """

    def __init__(self, hf_dir: Path) -> None:
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise UserError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        self.entries: dict[str, TensorEntry] = {}
        for name in files:
            if not (self.dir / name).is_file():
                raise UserError(f"{self.dir / name}: named by model.safetensors.index.json but missing")
            self.entries |= read_safetensors_header(self.dir / name)
        self._fds: dict[str, int] = {}
        self._maps: dict[str, tuple[mmap.mmap, Any]] | None = None  # file -> (map, uint8 tensor over it)
        self._touched: list[TensorEntry] = []  # entries handed out since the last release()

    def map_files(self) -> None:
        """From now on `get` returns views of a private (copy-on-write) memory map of its file.

        Nothing is read until a byte is used. A writer that moves a view's bytes with
        `os.copy_file_range` (file to file, inside the kernel; see `locate`) never brings them
        into this process at all; views it does compute with (casts, TP column splits) fault
        their pages in, and `release()` drops them again, so RSS holds one item at most.
        """
        self._maps = {}

    def locate(self, tensor: Any) -> tuple[int, int] | None:
        """(file descriptor, byte offset) of a contiguous view of a mapped file, else None."""
        if self._maps is None or not tensor.is_contiguous():
            return None
        ptr, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        for file, (_, base) in self._maps.items():
            start = base.data_ptr()
            if start <= ptr and ptr + nbytes <= start + base.numel():
                return self._fds[file], ptr - start
        return None

    def release(self) -> None:
        """The caller is done with every tensor got so far: drop their mapped pages from RSS."""
        if self._maps is not None:
            for e in self._touched:
                mm = self._maps[e.file][0]
                first = e.start - e.start % mmap.PAGESIZE
                mm.madvise(mmap.MADV_DONTNEED, first, e.start + e.nbytes - first)
        self._touched.clear()

    def names(self) -> list[str]:
        return list(self.entries)

    def files(self) -> list[Path]:
        return [self.dir / f for f in sorted({e.file for e in self.entries.values()})]

    def entry(self, name: str) -> TensorEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise UserError(f"{self.dir}: tensor '{name}' is missing from the checkpoint")
        return entry

    def meta(self, name: str) -> Any:
        """A meta-device tensor with the stored shape and dtype (reads nothing)."""
        import torch

        e = self.entry(name)
        return torch.empty(e.shape, dtype=getattr(torch, e.dtype), device="meta")

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(self.dir / file, os.O_RDONLY)
        return self._fds[file]

    def get(self, name: str) -> Any:
        import torch

        e = self.entry(name)
        fd = self._fd(e.file)
        dtype = getattr(torch, e.dtype)
        if self._maps is not None and e.start % dtype.itemsize == 0:
            if e.file not in self._maps:
                if os.fstat(fd).st_size < e.start + e.nbytes:
                    raise UserError(f"{self.dir / e.file}: truncated inside tensor '{name}'")
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "non-writable buffer": ACCESS_COPY is writable
                    self._maps[e.file] = (mm, torch.frombuffer(mm, dtype=torch.uint8))
            self._touched.append(e)
            return self._maps[e.file][1][e.start : e.start + e.nbytes].view(dtype).reshape(e.shape)
        buf = torch.empty(e.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < e.nbytes:
            n = os.preadv(fd, [view[done:]], e.start + done)
            if n == 0:
                raise UserError(f"{self.dir / e.file}: truncated inside tensor '{name}'")
            done += n
        return buf.view(dtype).reshape(e.shape)

    def close(self) -> None:
        """Close the files; the maps go when the last tensor viewing them does."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._maps = None
        self._touched.clear()

    def dtype_of(self, name: str) -> str:
        """The stored dtype as a torch dtype name ("bfloat16", "float32", ...)."""
        return self.entry(name).dtype


def check_tensor_names(reader: HFReader, expected: Iterable[str], tied: bool) -> None:
    """Missing or extra tensors: a one-line error naming the first few."""
    expected = set(expected)
    present = set(reader.names())
    if tied:
        present.discard("lm_head.weight")  # some tied checkpoints still store the copy
    missing = sorted(expected - present)
    extra = sorted(present - expected)
    if missing:
        raise UserError(
            f"{reader.dir}: tensor '{missing[0]}' is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ": the checkpoint does not match the model shape; check --recipe"
        )
    if extra:
        raise UserError(
            f"{reader.dir}: unexpected tensor '{extra[0]}'"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + ": the checkpoint does not match the model shape; check --recipe"
        )


def hf_config_for(shape: ModelShape) -> dict[str, Any]:
    """A config.json for `shape` (used when the original one was not kept)."""
    cfg: dict[str, Any] = {
        "architectures": [shape.hf_architecture],
        "model_type": family_named(shape.family).model_type,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_query_groups,
        "head_dim": shape.head_dim,
        "intermediate_size": shape.ffn_hidden_size,
        "vocab_size": shape.vocab_size,
        "tie_word_embeddings": shape.tie_embeddings,
        "max_position_embeddings": shape.max_position_embeddings,
        "rope_theta": shape.rope_theta,
        "rms_norm_eps": shape.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": shape.qkv_bias,
    }
    if shape.is_moe:
        cfg |= {
            "num_experts": shape.num_experts,
            "moe_intermediate_size": shape.moe_ffn_hidden_size,
            "num_experts_per_tok": shape.moe_router_topk,
            "norm_topk_prob": shape.moe_norm_topk_prob,
            "router_aux_loss_coef": shape.moe_aux_loss_coeff,
        }
    return cfg


def copy_hf_assets(src_dir: Path, dst_dir: Path) -> None:
    """config.json and the tokenizer files, as they are."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", *TOKENIZER_FILES):
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, dst_dir / name)


USE_COPY_FILE_RANGE = True  # tests switch it off to run the sendfile path on one filesystem


def copy_file_bytes(src: int, dst: int, nbytes: int, src_offset: int, dst_offset: int) -> None:
    """Copy `nbytes` from one open file to another inside the kernel, at the given offsets.

    `os.copy_file_range` (page cache to page cache, one copy, none through user memory); where
    Linux refuses it (across filesystems: EXDEV), `os.sendfile` does the same from a seek position.
    """
    done = 0
    kernel_copy = USE_COPY_FILE_RANGE
    while done < nbytes:
        if kernel_copy:
            try:
                n = os.copy_file_range(src, dst, nbytes - done, src_offset + done, dst_offset + done)
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                kernel_copy = False
                continue
        else:
            os.lseek(dst, dst_offset + done, os.SEEK_SET)
            n = os.sendfile(dst, src, src_offset + done, nbytes - done)
        if n == 0:
            raise RuntimeError(f"source file ended {nbytes - done} bytes short of the tensor")
        done += n


HEADER_ROOM_PER_TENSOR = 160  # JSON bytes of one header entry besides its name (dtype, shape, offsets)


class SafetensorsShard:
    """One safetensors file written as tensors arrive: the data goes straight to its place after
    a header area reserved up front, and the header is written last, padded with spaces (as the
    format allows) to the reserved size. Memory holds one tensor, not the shard."""

    def __init__(self, path: Path, header_room: int) -> None:
        self.path = path
        self.header_room = -(-header_room // 8) * 8  # data starts 8-byte aligned
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.size = 0

    def add(self, name: str, tensor: Any) -> None:
        import torch

        view = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        start = 8 + self.header_room + self.size
        done = 0
        while done < len(view):  # one pwrite moves at most ~2 GB on Linux: loop
            done += os.pwrite(self.fd, view[done:], start + done)
        dtype = SAFETENSORS_NAME[str(tensor.dtype).removeprefix("torch.")]
        self.header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [self.size, self.size + len(view)]}
        self.size += len(view)

    def close(self) -> None:
        head = json.dumps(self.header, separators=(",", ":")).encode()
        if len(head) > self.header_room:  # more or longer names than reserved: move the data up
            room = -(-len(head) // 8) * 8
            moved = self.path.with_name(self.path.name + ".moving")
            fd = os.open(moved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            src = os.open(self.path, os.O_RDONLY)
            copy_file_bytes(src, fd, self.size, 8 + self.header_room, 8 + room)
            os.close(src)
            os.close(self.fd)
            os.replace(moved, self.path)
            self.fd, self.header_room = fd, room
        head += b" " * (self.header_room - len(head))
        os.pwrite(self.fd, len(head).to_bytes(8, "little") + head, 0)
        os.close(self.fd)


def write_safetensors_shards(
    out_dir: Path, tensors: Iterator[tuple[str, Any]], max_shard_bytes: int = 2 * 1024**3,
    names: Iterable[str] = (),
) -> dict[str, str]:
    """Stream (name, tensor) into model-0000i-of-0000n.safetensors shards plus the index.

    Each tensor is written to its shard as it arrives (`SafetensorsShard`): memory holds one
    tensor. `names` (every name to come, if known) sizes the header area each shard reserves.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    room = sum(len(json.dumps(n)) + HEADER_ROOM_PER_TENSOR for n in names) or 64 * 1024
    weight_map: dict[str, str] = {}
    files: list[list[str]] = []
    shard: SafetensorsShard | None = None
    total = 0
    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard is not None and shard.size and shard.size + size > max_shard_bytes:
            shard.close()
            shard = None
        if shard is None:
            tmp_name = f"shard-{len(files):05d}.safetensors"
            shard = SafetensorsShard(out_dir / tmp_name, room)
            files.append([tmp_name])
        shard.add(name, tensor)
        files[-1].append(name)
        total += size
    if shard is not None:
        shard.close()
    n = len(files)
    for i, (tmp_name, *shard_names) in enumerate(files):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out_dir / tmp_name, out_dir / final)
        weight_map |= dict.fromkeys(shard_names, final)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
