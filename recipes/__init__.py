"""Recipes: one declarative module per model, plus the validator and the planner.

    from qwen_pretrain.recipes import get_recipe, override, check_layout
    recipe = override(get_recipe("qwen3_8b"), tp=4, gpus=16)
    check_layout(recipe)          # raises LayoutError naming every broken rule
"""

from __future__ import annotations

import importlib

from qwen_pretrain.recipes.errors import LayoutError, UserError
from qwen_pretrain.recipes.overrides import OffBenchmarkError, override
from qwen_pretrain.recipes.schema import (
    QWEN_EOD_TOKEN_ID,
    Acceptance,
    Data,
    ModelShape,
    Parallelism,
    Recipe,
    Training,
)
from qwen_pretrain.recipes.validate import check_layout, validate_layout

# Registry order is the order of `recipes list`.
RECIPE_MODULES: tuple[str, ...] = (
    "qwen3_0p6b",
    "qwen3_1p7b",
    "qwen3_8b",
    "qwen3_30b_a3b",
    "qwen25_7b",
    "qwen25_72b",
    "qwen2_72b",
    "qwen3_tiny",
    "qwen25_tiny",
    "qwen3_moe_tiny",
)


def list_recipes() -> list[str]:
    return list(RECIPE_MODULES)


def get_recipe(name: str) -> Recipe:
    """The recipe registered under `name` (module name, dashes accepted for underscores)."""
    key = name.replace("-", "_").replace(".", "p").lower()
    if key not in RECIPE_MODULES:
        raise UserError(
            f"unknown recipe '{name}': choose one of {', '.join(RECIPE_MODULES)} "
            "(see `qwen-pretrain recipes list`)"
        )
    return importlib.import_module(f"qwen_pretrain.recipes.{key}").RECIPE


def all_recipes() -> list[Recipe]:
    return [get_recipe(name) for name in RECIPE_MODULES]


__all__ = [
    "QWEN_EOD_TOKEN_ID",
    "Acceptance",
    "Data",
    "LayoutError",
    "ModelShape",
    "OffBenchmarkError",
    "Parallelism",
    "Recipe",
    "Training",
    "UserError",
    "all_recipes",
    "check_layout",
    "get_recipe",
    "list_recipes",
    "override",
    "validate_layout",
]
