"""A recipe as a NeMo 2 pretraining script: the acceptance procedure's
`nemotron_pretraining_<model>.py`, generated from our recipe for every model NeMo has.

The script builds `llm.<nemo_recipe>.pretrain_recipe(num_nodes, num_gpus_per_node)` exactly as
the acceptance procedure does, then sets what our recipe fixes and nothing else:
global batch, micro batch, sequence length, the parallel layout, steps, validation cadence,
log cadence, the data (NeMo's MockDataModule to reproduce the baseline, or PreTrainingDataModule
on our preprocessed .bin/.idx prefixes) and `TimingCallback(log_tokens_per_sec=True)` so that
`tokens_per_sec_per_gpu` is printed. Optimizer and LR schedule stay NeMo's recipe defaults, as in
the baseline. The seed: NeMo 2 (2.5.3 and 2.7.3 alike) seeds model-parallel RNGs with 1234 whatever
the recipe says (`nemo.lightning._strategy_lib.init_parallel_ranks`) and the data module takes ours,
so a seed other than 1234 is refused for this backend.

The script runs in NeMo 2.5 (the NGC nemo:25.09 image) and 2.7: every name it uses is the same in
both. What another NeMo may lack, it checks for by feature, not by version, and stops with one line
saying what to do: `nemo.collections.llm` itself (gone in NeMo 3), the model's recipe (NeMo added
its Qwen3 recipes in 2.4) and TimingCallback's `log_tokens_per_sec` option.

`--dump-json PATH` builds the recipe object, writes every field we set as read back from it, and
exits: the NeMo check (tests/test_launch_nemo_env.py) runs exactly this script.
"""

from __future__ import annotations

from qwen_pretrain.launch.nemo_run import ExecutorOptions, cli_source, executor_source
from qwen_pretrain.launch.render_megatron import LOG_INTERVAL, DataSpec
from qwen_pretrain.launch.slurm import DEFAULT_IMAGE
from qwen_pretrain.recipes import Recipe, UserError

NEMO_FIXED_SEED = 1234


def nemo_settings(recipe: Recipe, nodes: int, gpus_per_node: int) -> dict[str, object]:
    """{dotted attribute path of NeMo's recipe object: value} for everything we set."""
    p, t = recipe.parallel, recipe.training
    return {
        "trainer.num_nodes": nodes,
        "trainer.devices": gpus_per_node,
        "trainer.max_steps": t.train_steps,
        "trainer.log_every_n_steps": LOG_INTERVAL,
        "trainer.val_check_interval": t.eval_interval,
        "trainer.limit_val_batches": t.eval_iters,
        "trainer.strategy.tensor_model_parallel_size": p.tp,
        "trainer.strategy.pipeline_model_parallel_size": p.pp,
        "trainer.strategy.virtual_pipeline_model_parallel_size": p.vpp if p.pp > 1 else None,
        "trainer.strategy.context_parallel_size": p.cp,
        "trainer.strategy.sequence_parallel": p.sequence_parallel,
        "trainer.strategy.expert_model_parallel_size": p.ep,
        "trainer.strategy.expert_tensor_parallel_size": p.etp,
        "data.global_batch_size": t.global_batch_size,
        "data.micro_batch_size": p.micro_batch_size,
        "data.seq_length": t.seq_length,
    }


def nemo_data(recipe: Recipe, data: DataSpec) -> dict[str, object]:
    """The data module: mock (the baseline) or PreTrainingDataModule on our prefixes."""
    if data.mock:
        return {"kind": "mock", "tokenizer_dir": data.tokenizer_dir}
    paths: list[object] = []
    for weight, prefix in data.blend:
        paths += [weight, prefix]
    return {
        "kind": "pretraining",
        "tokenizer_dir": data.tokenizer_dir,
        "paths": paths,
        "split": data.split,
        "seed": recipe.training.seed,
        "reset_position_ids": recipe.data.reset_position_ids,
        "reset_attention_mask": recipe.data.reset_attention_mask,
    }


def check_nemo_recipe(recipe: Recipe) -> str:
    if not recipe.nemo_recipe:
        raise UserError(
            f"--backend nemo: recipe '{recipe.name}' has no NeMo 2 counterpart (nemo_recipe is None); "
            "use --backend mcore"
        )
    if recipe.training.seed != NEMO_FIXED_SEED:
        raise UserError(
            f"--backend nemo: seed {recipe.training.seed} cannot be applied, NeMo 2 seeds model-parallel "
            f"RNGs with {NEMO_FIXED_SEED}; use --seed {NEMO_FIXED_SEED} or --backend mcore"
        )
    return recipe.nemo_recipe


_BODY = '''
MODEL = {model!r}
SETTINGS = {settings!r}
DATA = {data!r}
WHAT_TO_DO = "use NeMo 2.5 to 2.7 ({image} has 2.5) or `qwen-pretrain launch --backend mcore`"


def _get(obj, dotted):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def _set(obj, dotted, value):
    *parents, last = dotted.split(".")
    setattr(_get(obj, ".".join(parents)) if parents else obj, last, value)


def _tokenizer(default):
    if DATA["tokenizer_dir"] is None:
        return default  # NeMo's own choice (an AutoTokenizer of the model's Hugging Face id)
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
    return run.Config(AutoTokenizer, pretrained_model_name=DATA["tokenizer_dir"])


def _nemo_release():
    try:
        import nemo
    except ImportError:
        return "(not installed)"
    return getattr(nemo, "__version__", "(unknown version)")


def _nemo_llm():
    """nemo.collections.llm, or one line on why it cannot be imported (NeMo 3 no longer has it)."""
    try:
        from nemo.collections import llm
    except ImportError as error:
        sys.exit(f"error: NeMo {{_nemo_release()}}: cannot import nemo.collections.llm ({{error}}); {{WHAT_TO_DO}}")
    return llm


def _recipe_module(llm):
    """llm.<MODEL>, or one line on why this NeMo lacks it."""
    module = getattr(llm, MODEL, None)
    if module is not None:
        return module
    import importlib.util
    if importlib.util.find_spec("nemo.collections.llm.recipes." + MODEL) is not None:
        why = "its recipes failed to import (NeMo's warning above says why)"
    else:
        why = "NeMo added its Qwen3 recipes in 2.4"
    sys.exit(f"error: NeMo {{_nemo_release()}} has no recipe llm.{{MODEL}} ({{why}}); {{WHAT_TO_DO}}")


def _timing_callback(TimingCallback):
    """The acceptance procedure's callback: timing with tokens/s, which the benchmark parser reads."""
    import inspect
    if "log_tokens_per_sec" not in inspect.signature(TimingCallback).parameters:
        sys.exit(f"error: NeMo {{_nemo_release()}}'s TimingCallback has no log_tokens_per_sec option, so "
                 f"tokens_per_sec_per_gpu would not be logged; {{WHAT_TO_DO}}")
    return run.Config(TimingCallback, log_tokens_per_sec=True)


def build_recipe(job_dir):
    llm = _nemo_llm()
    from nemo.utils.exp_manager import TimingCallback

    recipe = _recipe_module(llm).pretrain_recipe(
        name=MODEL + "_pretraining", dir=job_dir,
        num_nodes=SETTINGS["trainer.num_nodes"], num_gpus_per_node=SETTINGS["trainer.devices"],
    )
    if DATA["kind"] == "pretraining":
        recipe.data = run.Config(
            llm.PreTrainingDataModule, paths=list(DATA["paths"]), split=DATA["split"], seed=DATA["seed"],
            reset_position_ids=DATA["reset_position_ids"], reset_attention_mask=DATA["reset_attention_mask"],
            tokenizer=_tokenizer(recipe.data.tokenizer),
        )
    else:
        recipe.data.tokenizer = _tokenizer(recipe.data.tokenizer)
    for dotted, value in SETTINGS.items():
        _set(recipe, dotted, value)
    strategy = recipe.trainer.strategy
    if strategy.pipeline_model_parallel_size > 1 and strategy.pipeline_dtype is None:
        import torch
        strategy.pipeline_dtype = torch.bfloat16
    recipe.trainer.callbacks = [_timing_callback(TimingCallback)]
    return recipe


def dump(recipe, path):
    """Every field we set, read back from the built recipe object (for the NeMo check)."""
    out = {{dotted: _get(recipe, dotted) for dotted in SETTINGS}}
    out["model"] = MODEL
    out["data.class"] = recipe.data.__fn_or_cls__.__name__
    for key in ("paths", "split", "seed", "reset_position_ids", "reset_attention_mask"):
        if key in DATA:
            out["data." + key] = getattr(recipe.data, key)
    tok = recipe.data.tokenizer
    out["data.tokenizer"] = getattr(tok, "pretrained_model_name", None)
    out["callbacks"] = [
        {{"class": c.__fn_or_cls__.__name__, "log_tokens_per_sec": getattr(c, "log_tokens_per_sec", None)}}
        for c in recipe.trainer.callbacks
    ]
    import fiddle as fdl
    fdl.build(recipe.trainer.callbacks[0])  # the callback accepts the option in this NeMo version
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)


def extra_arguments(parser):
    parser.add_argument("--dump-json", metavar="PATH", help="build the recipe, write the fields we set, exit")


def build_task(args):
    recipe = build_recipe(EXECUTOR["job_dir"])
    if args.dump_json:
        dump(recipe, args.dump_json)
        return None
    return recipe
'''


def render_nemo_script(
    recipe: Recipe, data: DataSpec, opts: ExecutorOptions, comments: list[str] | None = None
) -> str:
    """The standalone NeMo 2 pretraining script for `recipe` (imports NeMo and nemo-run only)."""
    model = check_nemo_recipe(recipe)
    settings = nemo_settings(recipe, opts.nodes, opts.procs_per_node)
    header = [
        f'"""NeMo 2 pretraining of {recipe.hf_name}: llm.{model}.pretrain_recipe with recipe '
        f"'{recipe.name}' applied.",
        "",
        "Rendered by `qwen-pretrain launch --backend nemo` (qwen_pretrain/launch/render_nemo.py);",
        "the equivalent of the acceptance procedure's nemotron_pretraining_<model>.py.",
        "    python THIS.py [--executor local|slurm|direct] [--dryrun] [--dump-json PATH]",
        *(comments or []),
        '"""',
        "",
        "import argparse",
        "import json",
        "import sys",
        "",
        "import nemo_run as run",
        "",
    ]
    body = _BODY.format(model=model, settings=settings, data=nemo_data(recipe, data), image=DEFAULT_IMAGE)
    return "\n".join(header) + executor_source(opts) + body + cli_source(opts.kind, f"{model}_pretraining")
