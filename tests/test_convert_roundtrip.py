"""HF -> megatron-core -> HF round trips (bitwise), and `verify` against transformers logits.

Real parts throughout: safetensors files, megatron-core `dist_checkpointing`, torch.save rank
files, the trainer's GPTModel builder (local spec on CPU), `transformers` models.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from qwen_pretrain.conversion import hf_io
from qwen_pretrain.conversion.convert import hf_to_mcore, mcore_to_hf, verify
from qwen_pretrain.conversion.layout import McoreLayout
from qwen_pretrain.conversion.mapping import (
    expected_hf_shapes,
    hf_tensors_from_mcore,
    iter_rank_tensors,
    iter_stage_tensors,
)
from qwen_pretrain.recipes import get_recipe
from qwen_pretrain.recipes.schema import ModelShape
from safetensors.torch import load_file, save_file

FAMILIES = ("qwen3_tiny", "qwen25_tiny", "qwen3_moe_tiny")


def write_random_hf(path: Path, shape: ModelShape, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A Hugging Face directory with random tensors of `shape` (config.json + safetensors)."""
    gen = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    tensors = {k: torch.randn(s, generator=gen).to(dtype) for k, s in expected_hf_shapes(shape).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_io.hf_config_for(shape)))
    return path


def write_transformers_hf(path: Path, shape: ModelShape, seed: int = 0) -> Path:
    """A real `transformers` model of `shape` with random weights, saved with save_pretrained."""
    import transformers

    cfg = hf_io.hf_config_for(shape)
    cls = {"qwen3": transformers.Qwen3Config, "qwen2": transformers.Qwen2Config, "qwen3_moe": transformers.Qwen3MoeConfig}
    config = cls[shape.family](**{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # larger than init so that every tensor matters in the logits
    model.save_pretrained(str(path))
    return path


def assert_same_hf(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_bitwise(tmp_path: Path, name: str, fmt: str) -> None:
    shape = get_recipe(name).model  # real vocab 151936: the recipe is matched from config.json
    hf = write_random_hf(tmp_path / "hf", shape)
    ep = 2 if shape.is_moe else 1
    hf_to_mcore(hf, tmp_path / "mcore", tp=2, pp=2, ep=ep, fmt=fmt, quiet=True)
    info = json.loads((tmp_path / "mcore" / "conversion.json").read_text())
    assert info["recipe"] == name and info["layout"]["tp"] == 2
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", quiet=True)
    assert_same_hf(hf, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((hf / "config.json").read_text())


def test_legacy_layout_matches_megatron_lm(tmp_path: Path) -> None:
    shape = get_recipe("qwen3_moe_tiny").model
    hf = write_random_hf(tmp_path / "hf", dataclasses.replace(shape, vocab_size=1000))
    hf_to_mcore(hf, tmp_path / "m", tp=2, pp=2, ep=2, fmt="legacy", quiet=True)
    assert (tmp_path / "m" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    dirs = sorted(p.name for p in (tmp_path / "m" / "iter_0000000").iterdir())
    assert dirs == [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t, p, e in itertools.product(range(2), range(2), range(2))]
    sd = torch.load(tmp_path / "m/iter_0000000/mp_rank_01_001_001/model_optim_rng.pt", weights_only=False)
    assert sd["checkpoint_version"] == 3.0 and sd["iteration"] == 0
    assert sd["args"].tensor_model_parallel_size == 2 and sd["args"].padded_vocab_size == 1024
    # EP rank 1 holds global experts 4..7 as local 0..3; the last stage holds the output layer
    assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight" in sd["model"]
    assert sd["model"]["output_layer.weight"].shape == (512, shape.hidden_size)
    assert "embedding.word_embeddings.weight" not in sd["model"]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_layout_round_trips_in_memory(name: str) -> None:
    """The mapping alone: TP/PP/VPP/EP/ETP, local and TE specs, all three expert layouts."""
    shape = dataclasses.replace(get_recipe(name).model, vocab_size=1000)
    gen = torch.Generator().manual_seed(1)
    hf = {k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in expected_hf_shapes(shape).items()}
    expert_layouts = ("sequential", "te_grouped", "legacy_grouped") if shape.is_moe else ("sequential",)
    for tp, pp, vpp, spec, experts in itertools.product((1, 2), (1, 2), (None, 2), ("local", "te"), expert_layouts):
        if vpp and pp == 1:
            continue
        for ep, etp in itertools.product((1, 2) if shape.is_moe else (1,), {1, tp} if shape.is_moe else (1,)):
            layout = McoreLayout(tp, pp, ep, vpp, etp, spec, experts)
            shards = {r: dict(iter_rank_tensors(shape, layout, r, hf.__getitem__)) for r in layout.ranks()}
            back = dict(hf_tensors_from_mcore(shape, lambda r, n, s=shards: s[r][n], layout))
            assert back.keys() == hf.keys(), layout
            for k in hf:
                assert torch.equal(back[k], hf[k]), (k, layout)


@pytest.mark.parametrize("name", FAMILIES)
def test_pieces_are_the_shards_bytes(name: str) -> None:
    """The legacy writer's zero-copy pieces (QKV groups, gate/up halves, padded vocab rows)
    laid end to end are byte for byte the shard the mapping builds."""
    shape = dataclasses.replace(get_recipe(name).model, vocab_size=1000)  # padded to 1024 / 1152
    gen = torch.Generator().manual_seed(2)
    hf = {k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in expected_hf_shapes(shape).items()}
    for tp, pp, ep in itertools.product((1, 2), (1, 2), (1, 2) if shape.is_moe else (1,)):
        layout = McoreLayout(tp, pp, ep, etp=tp if shape.is_moe else 1)
        whole = list(iter_stage_tensors(shape, layout, layout.ranks(), hf.__getitem__))
        parts = list(iter_stage_tensors(shape, layout, layout.ranks(), hf.__getitem__, pieces=True))
        assert [(r, n) for r, n, _ in whole] == [(r, n) for r, n, _ in parts]
        for (_, n, t), (_, _, p) in zip(whole, parts, strict=True):
            if t is None:
                assert p is None
                continue
            assert all(x.is_contiguous() for x in p), n
            assert torch.equal(torch.cat([x.reshape(-1) for x in p]), t.reshape(-1)), (n, layout)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_tables_name_what_transformers_saves(tmp_path: Path, name: str) -> None:
    """Each family's tables (`conversion/families.py`) give the names and shapes of the tensors a
    `transformers` model saves for the config.json the converter writes, and that config.json
    reads back to the recipe's structure."""
    from safetensors import safe_open

    shape = dataclasses.replace(get_recipe(name).model, vocab_size=1000)
    hf = write_transformers_hf(tmp_path / "hf", shape)
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if shape.tie_embeddings:
        saved.pop("lm_head.weight", None)
    assert saved == expected_hf_shapes(shape)
    found = hf_io.shape_from_config(hf_io.read_config(hf))
    assert {f: getattr(found, f) for f in hf_io.STRUCTURAL_FIELDS} == {f: getattr(shape, f) for f in hf_io.STRUCTURAL_FIELDS}


@pytest.mark.parametrize(("name", "fmt"), [("qwen3_tiny", "torch_dist"), ("qwen25_tiny", "legacy"), ("qwen3_moe_tiny", "torch_dist")])
def test_verify_against_transformers(tmp_path: Path, name: str, fmt: str) -> None:
    shape = dataclasses.replace(get_recipe(name).model, vocab_size=2048)  # smaller vocab: faster
    hf = write_transformers_hf(tmp_path / "hf", shape)
    ep = 2 if shape.is_moe else 1
    hf_to_mcore(hf, tmp_path / "mcore", tp=2, pp=2, ep=ep, fmt=fmt, quiet=True)
    result = verify(hf, tmp_path / "mcore")
    assert result.max_abs_diff <= 1e-5, result
    assert result.top1_agreement == 1.0


def test_verify_fails_on_wrong_weights(tmp_path: Path) -> None:
    shape = dataclasses.replace(get_recipe("qwen3_tiny").model, vocab_size=2048)
    hf = write_transformers_hf(tmp_path / "hf", shape, seed=0)
    other = write_transformers_hf(tmp_path / "other", shape, seed=1)
    hf_to_mcore(other, tmp_path / "mcore", fmt="legacy", quiet=True)
    from qwen_pretrain.launch.cli import main

    assert main(["convert", "verify", "--hf", str(hf), "--mcore", str(tmp_path / "mcore")]) == 1


@pytest.mark.slow
def test_round_trip_qwen3_0p6b_shape(tmp_path: Path) -> None:
    """Random weights with the real Qwen3-0.6B shape (bf16, ~1.2 GB), TP=2 PP=2, both formats."""
    shape = get_recipe("qwen3_0p6b").model
    hf = write_random_hf(tmp_path / "hf", shape)
    for fmt in ("legacy", "torch_dist"):
        hf_to_mcore(hf, tmp_path / f"m_{fmt}", tp=2, pp=2, fmt=fmt, quiet=True)
        mcore_to_hf(tmp_path / f"m_{fmt}", tmp_path / f"back_{fmt}", quiet=True)
        assert_same_hf(hf, tmp_path / f"back_{fmt}")


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "sendfile"])
def test_legacy_pieces_go_file_to_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copy: bool) -> None:
    """Legacy output: pieces that are byte ranges of the HF files are copied by the kernel (both
    the copy_file_range path and the sendfile fallback used across filesystems); the rest is
    written from memory; the round trip stays bitwise."""
    from qwen_pretrain.conversion import legacy

    copied = []
    real = legacy.copy_file_bytes
    monkeypatch.setattr(legacy, "copy_file_bytes", lambda *a: (copied.append(a[2]), real(*a)))
    monkeypatch.setattr(hf_io, "USE_COPY_FILE_RANGE", kernel_copy)
    shape = get_recipe("qwen3_tiny").model
    hf = write_random_hf(tmp_path / "hf", shape)
    hf_to_mcore(hf, tmp_path / "mcore", tp=2, pp=2, fmt="legacy", quiet=True)
    written = sum(f.stat().st_size for f in (tmp_path / "mcore").rglob("model_optim_rng.pt"))
    assert sum(copied) > 0.5 * written  # embedding, QKV groups, gate/up halves, norms
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", quiet=True)
    assert_same_hf(hf, tmp_path / "back")


def test_copy_file_bytes_at_offsets_and_across_filesystems(tmp_path: Path) -> None:
    from qwen_pretrain.conversion.hf_io import copy_file_bytes

    data = bytes(range(256)) * 5000
    places = [tmp_path] + ([Path("/dev/shm")] if Path("/dev/shm").is_dir() else [])  # tmpfs: EXDEV
    for place in places:
        src, dst = tmp_path / "src", place / f"qwen_pretrain_test_dst_{os.getpid()}"
        src.write_bytes(data)
        dst.write_bytes(b"\0" * 1000)
        try:
            s, d = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
            copy_file_bytes(s, d, 700_001, 13, 101)
            os.close(s)
            os.close(d)
            got = dst.read_bytes()
            assert got[:101] == b"\0" * 101 and got[101:] == data[13:13 + 700_001]
        finally:
            dst.unlink(missing_ok=True)


def test_torch_dist_parts_merge_to_what_one_save_writes(tmp_path: Path) -> None:
    """The part-by-part torch_dist writer against megatron-core saving the whole model in one
    `dist_checkpointing.save`: the same tensors, global shapes, dtypes and chunks, and the same
    values read back by `dist_checkpointing.load`."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from qwen_pretrain.conversion.torch_dist import meta_model
    from torch.distributed.checkpoint import FileSystemReader

    shape = get_recipe("qwen3_moe_tiny").model  # MoE: expert tensors stacked by layer and by expert
    hf = write_random_hf(tmp_path / "hf", shape)
    hf_to_mcore(hf, tmp_path / "parts", fmt="torch_dist", quiet=True)

    reader = hf_io.HFReader(hf)
    one = McoreLayout()
    state = {n: t for _, n, t in iter_stage_tensors(shape, one, one.ranks(), reader.get) if t is not None}
    sharded = meta_model(shape).sharded_state_dict()
    for name, entry in sharded.items():
        if isinstance(entry, ShardedTensor | ShardedTensorFactory):
            entry.data = state[name]
            if isinstance(entry, ShardedTensor):
                entry.dtype = state[name].dtype
    (tmp_path / "whole").mkdir()
    dist_checkpointing.save({"model": sharded}, str(tmp_path / "whole"))

    ours = FileSystemReader(str(tmp_path / "parts" / "iter_0000000")).read_metadata().state_dict_metadata
    ref = FileSystemReader(str(tmp_path / "whole")).read_metadata().state_dict_metadata
    assert ours.keys() == ref.keys()
    for key, item in ref.items():
        if hasattr(item, "chunks"):
            assert (ours[key].size, ours[key].properties.dtype) == (item.size, item.properties.dtype), key
            chunks = sorted((tuple(c.offsets), tuple(c.sizes)) for c in item.chunks)
            assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in ours[key].chunks) == chunks, key
    def empty_model_state() -> dict:
        out = {}
        for name, entry in meta_model(shape).sharded_state_dict().items():
            if isinstance(entry, ShardedTensor | ShardedTensorFactory):
                entry.data = torch.empty(entry.data.shape, dtype=torch.bfloat16)
                if isinstance(entry, ShardedTensor):
                    entry.dtype = torch.bfloat16
                out[name] = entry
        return out

    loaded = [
        dist_checkpointing.load({"model": empty_model_state()}, str(path))["model"]
        for path in (tmp_path / "parts" / "iter_0000000", tmp_path / "whole")
    ]
    assert loaded[0].keys() == loaded[1].keys()
    for key in loaded[1]:
        if isinstance(loaded[1][key], torch.Tensor):
            assert torch.equal(loaded[0][key], loaded[1][key]), key


def test_torch_dist_regions_cross_chunks(tmp_path: Path) -> None:
    """The chunk reader assembles a region from every chunk it overlaps, as a checkpoint written
    at TP=2 stores a column-parallel weight (two row blocks), and says which region is missing."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from qwen_pretrain.conversion.torch_dist import TorchDistChunks, meta_model
    from qwen_pretrain.recipes.errors import UserError

    meta_model(get_recipe("qwen3_tiny").model)  # one-process parallel state, as the converter runs
    w = torch.arange(6 * 4 * 5, dtype=torch.float32).reshape(6, 4, 5)
    state = {  # both TP halves of "w" held by this one process: a complete grid
        "half0": ShardedTensor.from_rank_offsets("w", w[:, :2].clone(), (1, 0, 2)),
        "half1": ShardedTensor.from_rank_offsets("w", w[:, 2:].clone(), (1, 1, 2)),
    }
    dist_checkpointing.save(state, str(tmp_path))
    chunks = TorchDistChunks(tmp_path)
    assert len(chunks.tensors["w"].chunks) == 2
    assert torch.equal(chunks.read("w", (0, 0, 0), (6, 4, 5)), w)
    assert torch.equal(chunks.read("w", (2, 1, 1), (3, 2, 3)), w[2:5, 1:3, 1:4])  # across the seam
    with pytest.raises(UserError, match="do not cover"):
        chunks.read("w", (0, 3, 0), (1, 2, 5))  # rows 3..4: past the end of the tensor
    with pytest.raises(UserError, match="'v' is missing"):
        chunks.read("v", (0,), (1,))
    chunks.close()


@pytest.mark.parametrize("announce_names", [True, False], ids=["room-reserved", "header-outgrows-room"])
def test_streamed_safetensors_shards_read_back(tmp_path: Path, announce_names: bool) -> None:
    """HF output is written tensor by tensor into shards whose header is reserved up front; with
    no names announced the 64 KiB default room is too small here and the data is moved up.
    `safetensors` reads every shard back, the index names each tensor's shard."""
    gen = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.{'x' * 400}.weight": torch.randn(3, 5 + i % 4, generator=gen).to(torch.bfloat16)
               for i in range(700)}
    names = list(tensors) if announce_names else ()
    weight_map = hf_io.write_safetensors_shards(tmp_path / "out", iter(tensors.items()), max_shard_bytes=10_000, names=names)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map and set(weight_map) == set(tensors)
    assert len(set(weight_map.values())) > 1
    back = {}
    for f in sorted(set(weight_map.values())):
        back |= load_file(str(tmp_path / "out" / f))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert not list((tmp_path / "out").glob("*.moving")) and not list((tmp_path / "out").glob("shard-*"))
    header_bytes = int.from_bytes((tmp_path / "out" / weight_map[next(iter(tensors))]).read_bytes()[:8], "little")
    assert header_bytes > 64 * 1024  # the second case did outgrow the default room


def test_legacy_reader_release_keeps_values(tmp_path: Path) -> None:
    """Dropping a rank file's mapped pages (MADV_DONTNEED) loses nothing: a tensor read again
    after `release()` has the same values (its pages come back from the file)."""
    from qwen_pretrain.conversion.layout import RankCoord
    from qwen_pretrain.conversion.legacy import legacy_layout, legacy_reader
    from qwen_pretrain.training.checkpoint_dir import read_tracker

    shape = get_recipe("qwen3_tiny").model
    hf_to_mcore(write_random_hf(tmp_path / "hf", shape), tmp_path / "mcore", fmt="legacy", quiet=True)
    iter_dir = read_tracker(tmp_path / "mcore")
    layout, _ = legacy_layout(iter_dir)
    files = legacy_reader(iter_dir, layout)
    rank = RankCoord()
    names = ["embedding.word_embeddings.weight", "decoder.layers.0.mlp.linear_fc1.weight"]
    before = {n: files(rank, n).clone() for n in names}
    files.release()
    assert not files.touched
    for n in names:
        assert torch.equal(files(rank, n), before[n]), n


def test_meta_cat_gives_torch_cat_shapes() -> None:
    from qwen_pretrain.conversion.mapping import _cat

    parts = [torch.empty(2, 3, 4), torch.empty(2, 5, 4)]
    for dim, tensors in ((1, parts), (-2, parts), (0, [parts[0], parts[0]])):
        real = torch.cat(tensors, dim)
        meta = _cat([t.to("meta") for t in tensors], dim)
        assert meta.is_meta and meta.shape == real.shape and meta.dtype == real.dtype
