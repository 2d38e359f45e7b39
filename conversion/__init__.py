"""Conversion: Hugging Face safetensors <-> Megatron-core checkpoints.

    families.py         the per-family mapping tables (the one file to edit to add a family)
    mapping.py          the engine that applies them: plan, TP/PP/EP sharding, merging
    layout.py           megatron-core layouts (who holds what) and their checks
    hf_io.py            Hugging Face config.json, safetensors reading and sharded writing
    checkpoint_info.py  conversion.json, Megatron-LM `args`, which format a directory holds
    legacy.py           legacy per-rank `torch.save` files
    torch_dist.py       `dist_checkpointing` checkpoints, written part by part, read chunk by chunk
    convert.py          hf-to-mcore, mcore-to-hf, verify; cli.py: the `convert` command
"""
