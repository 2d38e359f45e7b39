"""Conversion: Hugging Face safetensors <-> Megatron-core checkpoints."""
