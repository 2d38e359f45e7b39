"""qwen3_tiny: see `tiny.py`, where the three tiny recipes share their training settings."""

from qwen_pretrain.recipes.tiny import QWEN3_TINY as RECIPE

__all__ = ["RECIPE"]
