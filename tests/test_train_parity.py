"""Parity: HF `transformers` Qwen3 / Qwen2 / Qwen3-MoE vs our megatron-core GPTModel (training/model.py).

A tiny HF model of each family (the tiny recipes' shapes, random weights, no download) is mapped
into megatron-core with `conversion/mapping.py` at TP=1, TP=2, PP=2, PP=2+VPP=2 and, for MoE,
EP=2; logits of every real token id must match within 1e-5 (fp32, CPU). Everything runs in one
torchrun job of two gloo processes (this file is also the worker script); megatron-core's
parallel state is rebuilt for each layout. Real parts throughout: only CUDA is bridged, by
`training/cpu_support.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOLERANCE = 1e-5
# (recipe, layouts); a layout is the overrides given to recipes.override.
CASES = {
    "qwen3_tiny": [dict(tp=1), dict(tp=2), dict(tp=1, pp=2), dict(tp=1, pp=2, vpp=2)],
    "qwen25_tiny": [dict(tp=1), dict(tp=2), dict(tp=1, pp=2)],
    "qwen3_moe_tiny": [dict(tp=1, ep=1), dict(tp=1, ep=2), dict(tp=2, ep=1),
                       dict(tp=1, ep=1, pp=2)],
}


def _hf_model(shape):
    """A transformers model of `shape` with seeded random weights (norms around 1)."""
    import torch
    import transformers
    from qwen_pretrain.conversion.hf_io import hf_config_for

    cfg = hf_config_for(shape)
    model_type = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.05
            p.copy_(1.0 + noise if "norm" in name else noise)
    return model.eval()


def _checkpoint_tensors(model, directory: Path) -> dict:
    """The tensors as a Hugging Face checkpoint names them (save_pretrained, then read back).

    transformers 5 keeps Qwen3-MoE experts fused in memory; checkpoints (and so the mapping)
    use the per-expert names, which save_pretrained writes.
    """
    from safetensors.torch import load_file

    model.save_pretrained(directory)
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _mcore_logits(recipe, hf_state: dict, tokens):
    """Full-vocabulary logits [b, s, padded_vocab] of our model with the HF weights, on every rank."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from qwen_pretrain.conversion.mapping import mcore_state_dict_from_hf
    from qwen_pretrain.training.parallel import build_model_chunks, init_parallel

    p = recipe.parallel
    init_parallel(recipe)
    chunks = build_model_chunks(recipe)
    for v, chunk in enumerate(chunks):
        sd = mcore_state_dict_from_hf(
            recipe.model, hf_state.__getitem__,
            tp=p.tp, tp_rank=ps.get_tensor_model_parallel_rank(),
            pp=p.pp, pp_rank=ps.get_pipeline_model_parallel_rank(),
            ep=p.ep, ep_rank=ps.get_expert_model_parallel_rank(),
            vpp=p.vpp, vpp_rank=v, etp=p.etp,
        )
        chunk.load_state_dict(sd, strict=True)
        chunk.eval()
    b, s = tokens.shape
    micro = [tokens[i : i + 1] for i in range(b)]  # VPP needs at least PP micro-batches
    positions = torch.arange(s).unsqueeze(0)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch, positions, None)

        def collect(output_tensor, non_loss_data=False):
            return output_tensor

        return out, collect

    config = chunks[0].config
    config.finalize_model_grads_func = None
    with torch.no_grad():
        data = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro),
            model=chunks, num_microbatches=b, seq_length=s, micro_batch_size=1,
            forward_only=True, collect_non_loss_data=True,
        )
    # The last stage holds the vocab-parallel logits: gather over TP, then hand them to all ranks.
    full = torch.zeros(b, s, recipe.model.padded_vocab_size(p.tp))
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        full = torch.cat(
            [tensor_parallel.gather_from_tensor_model_parallel_region(x) for x in data]
        ).reshape(full.shape)
    last = ps.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast(full, src=last, group=ps.get_pipeline_model_parallel_group())
    return full


def worker(out_path: str) -> None:
    """One torchrun rank: every case, every layout; rank 0 writes the max differences."""
    import torch
    import torch.distributed as dist
    from qwen_pretrain.recipes import check_layout, get_recipe, override
    from qwen_pretrain.training.parallel import destroy_parallel, init_distributed

    # HF references first, before torch.distributed exists: transformers' save_pretrained
    # writes only on rank 0 of an initialised process group.
    rank = int(os.environ["RANK"])
    refs = {}
    for name in CASES:
        base = get_recipe(name)
        hf = _hf_model(base.model)
        hf_state = _checkpoint_tensors(hf, Path(out_path).parent / f"hf_{name}_rank{rank}")
        gen = torch.Generator().manual_seed(7)
        tokens = torch.randint(0, base.model.vocab_size, (2, 16), generator=gen)
        with torch.no_grad():
            refs[name] = (hf_state, tokens, hf(input_ids=tokens).logits.float())
    init_distributed()
    world = dist.get_world_size()
    results = []
    for name, layouts in CASES.items():
        base = get_recipe(name)
        hf_state, tokens, ref = refs[name]
        for changes in layouts:
            recipe = override(base, gpus=world, **changes)
            check_layout(recipe)
            logits = _mcore_logits(recipe, hf_state, tokens)
            real = logits[..., : base.model.vocab_size]
            padded_rows = logits[..., base.model.vocab_size:]
            results.append({
                "recipe": name, "layout": changes,
                "max_abs_diff": float((real - ref).abs().max()),
                "ref_abs_max": float(ref.abs().max()),
                "padded_vocab": logits.shape[-1],
                "padded_logits_abs_max": float(padded_rows.abs().max()) if padded_rows.numel() else 0.0,
            })
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    destroy_parallel()


@pytest.fixture(scope="module")
def parity_results(tmp_path_factory, port, repo_root):
    out = tmp_path_factory.mktemp("parity") / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port), __file__, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=repo_root)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def port():  # module-scoped: one torchrun job for the whole module
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_family_and_layout_ran(parity_results):
    ran = {(r["recipe"], json.dumps(r["layout"], sort_keys=True)) for r in parity_results}
    expected = {(n, json.dumps(c, sort_keys=True)) for n, cs in CASES.items() for c in cs}
    assert ran == expected


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_hf_within_1e5(parity_results, name):
    rows = [r for r in parity_results if r["recipe"] == name]
    for r in rows:
        # Logits are O(1) here (weights are not the tiny default init), so 1e-5 is a real bound.
        assert r["ref_abs_max"] > 0.1, r
        assert r["max_abs_diff"] < TOLERANCE, r


def test_vocab_padding_follows_tp(parity_results):
    from qwen_pretrain.recipes import get_recipe

    for r in parity_results:
        shape = get_recipe(r["recipe"]).model
        assert r["padded_vocab"] == shape.padded_vocab_size(r["layout"].get("tp", 1))
    # TP=2 pads 151936 to 152064: the real tokens' logits still match (checked above).
    assert any(r["padded_vocab"] > get_recipe(r["recipe"]).model.vocab_size for r in parity_results)


def test_moe_routing_mapping_is_hf_norm_topk_prob():
    """norm_topk_prob=True is megatron-core's top-k-then-softmax (no pre-softmax), and back."""
    import dataclasses

    from qwen_pretrain.recipes import get_recipe, override
    from qwen_pretrain.training.model import transformer_config

    recipe = override(get_recipe("qwen3_moe_tiny"), ep=1, gpus=1)
    cfg = transformer_config(recipe)
    assert cfg.moe_router_pre_softmax is False and cfg.moe_router_topk == 2
    assert cfg.moe_token_dispatcher_type == "alltoall" and cfg.moe_grouped_gemm is False
    assert cfg.moe_aux_loss_coeff == recipe.model.moe_aux_loss_coeff
    raw = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, moe_norm_topk_prob=False))
    assert transformer_config(raw).moe_router_pre_softmax is True


if __name__ == "__main__":
    worker(sys.argv[1])
