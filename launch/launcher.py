"""`qwen-pretrain launch`: one recipe, a backend (what each process runs) and a launcher (how
the processes are started), checked before anything is submitted.

    backends   mcore        our Megatron-core trainer (`qwen_pretrain.training.cli`)
               nemo         NeMo 2 `llm.<model>.pretrain_recipe` (a rendered script, render_nemo.py)
               megatron-lm  Megatron-LM `pretrain_gpt.py` (render_megatron.py)
               mindspeed    MindSpeed-LLM `pretrain_gpt.py` on Ascend NPUs (a bash script per rank,
                            render_mindspeed.py)
    launchers  torchrun     this node, rendezvous from MASTER_ADDR/MASTER_PORT/NNODES/NODE_RANK/GPUS_PER_NODE
               slurm        an sbatch script (pyxis/enroot container for GPU jobs), submitted
               nemo-run     a nemo-run script (LocalExecutor with torchrun, or SlurmExecutor)

Refused before anything runs: fewer GPUs than the acceptance baseline (unless --off-benchmark,
then marked), an invalid layout, a GPU Slurm job without a container decision (--container
[IMAGE] or --no-container), missing node environment for torchrun, no data decision.
`--dry-run` prints exactly what would be written and run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qwen_pretrain.launch.nemo_run import ExecutorOptions, render_script_task
from qwen_pretrain.launch.render_megatron import DEFAULT_MEGATRON_LM_DIR, DataSpec, megatron_lm_args
from qwen_pretrain.launch.render_mindspeed import (
    DEFAULT_CANN_SET_ENV,
    DEFAULT_MINDSPEED_LLM_DIR,
    MindSpeedRun,
    render_mindspeed_script,
)
from qwen_pretrain.launch.render_nemo import check_nemo_recipe, render_nemo_script
from qwen_pretrain.launch.slurm import DEFAULT_IMAGE, SlurmJob, check_container, render_sbatch, submit
from qwen_pretrain.launch.torchrun import (
    TRAIN_MODULE,
    Entry,
    NodeEnv,
    read_node_env,
    torchrun_command,
    with_defaults,
)
from qwen_pretrain.recipes import Recipe, UserError
from qwen_pretrain.recipes.cli_args import add_recipe_args, off_benchmark_banner, recipe_from_args
from qwen_pretrain.recipes.files import atomic_write_text
from qwen_pretrain.training.data import parse_data_path
from qwen_pretrain.training.run_settings import run_settings

BACKENDS = ("mcore", "nemo", "megatron-lm", "mindspeed")
LAUNCHERS = ("torchrun", "slurm", "nemo-run")
REPO_ROOT = Path(__file__).resolve().parents[1]
# Inside a container the checkout is mounted here, so the plain NeMo image runs our trainer.
CONTAINER_SRC = "/opt/qwen-pretrain-src"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "launch", help="run a recipe with torchrun, Slurm or nemo-run (mcore, NeMo 2, Megatron-LM, MindSpeed-LLM)",
        description=__doc__.split("\n\n")[0],
    )
    add_recipe_args(p)
    p.add_argument("--backend", choices=BACKENDS, default="mcore")
    p.add_argument("--launcher", choices=LAUNCHERS, default="torchrun")
    p.add_argument("--nodes", type=int, help="nodes (torchrun: else $NNODES)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs (processes) per node (torchrun: else $GPUS_PER_NODE)")
    p.add_argument("--cpu", action="store_true", help="CPU processes (tiny recipes): no GPUs requested")
    d = p.add_argument_group("data")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--data-path", nargs="+", metavar="W_OR_PREFIX",
                     help="PREFIX or W1 PREFIX1 W2 PREFIX2 ... (preprocessed .bin/.idx prefixes)")
    src.add_argument("--mock-data", action="store_true", help="mock data (the acceptance baseline)")
    d.add_argument("--split", help="train,valid,test weights (default: the recipe's)")
    d.add_argument("--tokenizer-dir", help="Hugging Face tokenizer directory (NeMo, Megatron-LM)")
    c = p.add_argument_group("container (Slurm)")
    c.add_argument("--container", nargs="?", const=DEFAULT_IMAGE, metavar="IMAGE",
                   help=f"pyxis/enroot image; without a value: {DEFAULT_IMAGE}")
    c.add_argument("--no-container", action="store_true", help="run in the nodes' own environment")
    c.add_argument("--container-mounts", default="", help="extra SRC:DST[,SRC:DST...]")
    s = p.add_argument_group("Slurm / nemo-run")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--time", default="04:00:00", help="wall-clock limit (default 04:00:00)")
    s.add_argument("--job-name", help="default: RECIPE-BACKEND")
    s.add_argument("--executor", choices=("local", "slurm"), default="local", help="nemo-run executor")
    o = p.add_argument_group("run")
    o.add_argument("--run-dir", help="scripts and logs (default: runs/JOB_NAME)")
    o.add_argument("--megatron-lm-dir", default=DEFAULT_MEGATRON_LM_DIR, help="where pretrain_gpt.py lives")
    o.add_argument("--python", help="interpreter on the nodes (default: this one; `python` in a container; "
                                    ".venv-nemo's for NeMo)")
    o.add_argument("--dry-run", action="store_true", help="print what would be written and run; run nothing")
    m = p.add_argument_group("MindSpeed-LLM (--backend mindspeed, Ascend NPUs)")
    m.add_argument("--mindspeed-llm-dir", default=DEFAULT_MINDSPEED_LLM_DIR,
                   help=f"MindSpeed-LLM's checkout on the nodes (default {DEFAULT_MINDSPEED_LLM_DIR})")
    m.add_argument("--cann-set-env", default=DEFAULT_CANN_SET_ENV,
                   help=f"the CANN toolkit's set_env.sh on the nodes (default {DEFAULT_CANN_SET_ENV})")
    m.add_argument("--load", metavar="DIR", help="converted weights to start from (convert hf-to-mcore --target mindspeed)")
    m.add_argument("--save", metavar="DIR", help="checkpoint directory, saved at the end of the run")
    p.set_defaults(func=cmd_launch)


@dataclass(frozen=True)
class Rendered:
    """What a launch writes (path -> text) and the command it then runs."""

    summary: list[str]
    files: dict[str, str]
    command: list[str]
    submit: bool = False  # the command is sbatch: print the job id and log path
    slurm_job: SlurmJob | None = None
    env: dict[str, str] = field(default_factory=dict)  # exported to the command where not already set


def parse_data(args: argparse.Namespace, recipe: Recipe) -> DataSpec:
    """The data decision: --mock-data, --data-path (the trainer's parser, prefixes made absolute
    for the nodes), or the recipe's own blend."""
    split = args.split or recipe.data.split
    tok = args.tokenizer_dir and str(Path(args.tokenizer_dir).resolve())
    if args.mock_data:
        return DataSpec(mock=True, split=split, tokenizer_dir=tok)
    if not args.data_path:
        if recipe.data.blend:
            return DataSpec(blend=recipe.data.blend, split=split, tokenizer_dir=tok)
        raise UserError("choose the data: --data-path PREFIX or W1 PREFIX1 W2 PREFIX2 ... "
                        "(preprocessed .bin/.idx) or --mock-data")
    blend = tuple((w, str(Path(p).resolve())) for w, p in parse_data_path(args.data_path))
    return DataSpec(blend=blend, split=split, tokenizer_dir=tok)


def _layout(args: argparse.Namespace, recipe_gpus: int) -> tuple[int, int, NodeEnv | None]:
    """(nodes, processes per node, node env for torchrun)."""
    node = None
    if args.launcher == "torchrun":
        node = read_node_env(nnodes=args.nodes, gpus_per_node=args.gpus_per_node)
        nodes, per_node = node.nnodes, node.gpus_per_node
    else:
        total = args.gpus or recipe_gpus
        per_node = args.gpus_per_node or min(8, total)
        nodes = args.nodes or max(1, total // per_node)
    for name, value in (("--nodes", nodes), ("--gpus-per-node", per_node)):
        if value < 1:
            raise UserError(f"{name}={value} must be at least 1")
    if args.gpus is not None and args.gpus != nodes * per_node:
        raise UserError(f"--gpus {args.gpus} disagrees with {nodes} node(s) x {per_node} per node; drop --gpus")
    return nodes, per_node, node


def _container(args: argparse.Namespace, slurm: bool) -> str | None:
    if not slurm:
        if args.container or args.no_container:
            raise UserError("--container/--no-container apply to Slurm jobs; torchrun and the local "
                            "executor run in the current environment")
        return None
    if args.container is not None and args.no_container:
        raise UserError("--container and --no-container contradict each other; choose one")
    if args.container is not None and not args.container.strip():
        raise UserError("--container: empty image name; pass an image or --no-container")
    if args.container is None and not args.no_container and not args.cpu:
        raise UserError(
            "Slurm GPU jobs run in a container: pass --container [IMAGE] (without a value: "
            f"{DEFAULT_IMAGE}) or --no-container to use the nodes' own environment"
        )
    check_container(args.container)
    return args.container


def _check_mindspeed(args: argparse.Namespace, data: DataSpec) -> None:
    """What --backend mindspeed needs and refuses; --load/--save belong to it alone."""
    if args.backend != "mindspeed":
        if args.load or args.save:
            raise UserError("--load/--save are rendered for --backend mindspeed only (the mcore trainer "
                            "takes them in `qwen-pretrain train`)")
        return
    if args.launcher == "nemo-run":
        raise UserError("--backend mindspeed runs with --launcher torchrun or slurm (nemo-run does not start NPU jobs)")
    if args.cpu:
        raise UserError("--backend mindspeed runs on Ascend NPUs; drop --cpu")
    if not data.tokenizer_dir:
        raise UserError("--backend mindspeed: pass --tokenizer-dir DIR (MindSpeed-LLM builds its "
                        "PretrainedFromHF tokenizer from a Hugging Face directory)")
    if args.container == DEFAULT_IMAGE:
        raise UserError(f"--backend mindspeed: {DEFAULT_IMAGE} has no CANN or MindSpeed-LLM; pass an "
                        "Ascend image with --container IMAGE, or --no-container")
    # absolute, as the data prefixes: the ranks run from MindSpeed-LLM's checkout
    args.load, args.save = (str(Path(d).resolve()) if d else None for d in (args.load, args.save))


def _devices(backend: str, use_gpus: bool) -> str:
    return "NPUs" if backend == "mindspeed" else "GPUs" if use_gpus else "CPU processes"


def _python(args: argparse.Namespace, container: str | None, needs_nemo: bool) -> str:
    if args.python:
        return args.python
    if container:
        return "python"
    nemo_python = REPO_ROOT / ".venv-nemo" / "bin" / "python"
    if needs_nemo and nemo_python.exists():
        return str(nemo_python)
    return sys.executable


def _train_args(args: argparse.Namespace, recipe: Recipe, data: DataSpec, log_dir: str) -> list[str]:
    """`train` arguments: the recipe, the overrides the user gave, the data."""
    out = ["--recipe", recipe.name, "--device", "cpu" if args.cpu else "cuda"]
    for flag, value in (("--tp", args.tp), ("--pp", args.pp), ("--vpp", args.vpp), ("--cp", args.cp),
                        ("--ep", args.ep), ("--etp", args.etp), ("--mbs", args.mbs), ("--gbs", args.gbs),
                        ("--seq-length", args.seq_length), ("--seed", args.seed),
                        ("--train-steps", args.train_steps)):
        if value is not None:
            out += [flag, str(value)]
    if args.sequence_parallel is not None:
        out.append("--sp" if args.sequence_parallel else "--no-sp")
    if args.recompute is not None:
        raise UserError("--recompute is not an option of the mcore trainer; drop it or use --backend megatron-lm")
    if recipe.off_benchmark:
        out.append("--off-benchmark")
    if data.mock:
        out.append("--mock-data")
    else:
        out += ["--data-path", *data.data_path_args()]
    if args.split:
        out += ["--split", args.split]
    return out + ["--log-dir", log_dir]


def render(args: argparse.Namespace) -> Rendered:
    """Everything a launch would write and run; raises UserError for what must be refused."""
    from qwen_pretrain.recipes import get_recipe

    base = get_recipe(args.recipe)
    nodes, per_node, node = _layout(args, base.gpus)
    args.gpus = nodes * per_node
    recipe = recipe_from_args(args)  # refuses fewer GPUs than the baseline and invalid layouts
    data = parse_data(args, recipe)
    if args.backend == "nemo":
        check_nemo_recipe(recipe)
    _check_mindspeed(args, data)

    slurm = args.launcher == "slurm" or (args.launcher == "nemo-run" and args.executor == "slurm")
    container = _container(args, slurm)
    needs_nemo = args.backend == "nemo" or args.launcher == "nemo-run"
    python = _python(args, container, needs_nemo)
    if args.backend == "mindspeed":
        python = args.python or "python"  # the NPU nodes' interpreter (torch_npu), not this one
    job_name = args.job_name or f"{recipe.name}-{args.backend}"
    run_dir = str(Path(args.run_dir or Path("runs") / job_name).resolve())
    use_gpus = not args.cpu

    mounts = [m for m in args.container_mounts.split(",") if m]
    exports: list[tuple[str, str]] = []
    if container:
        mounts.append(f"{run_dir}:{run_dir}")
        mounts += sorted({f"{Path(p).parent}:{Path(p).parent}" for _, p in data.blend})
        if data.tokenizer_dir:
            mounts.append(f"{data.tokenizer_dir}:{data.tokenizer_dir}")
        mounts += [f"{d}:{d}" for d in (args.load, args.save) if d]
        if args.backend == "mcore":
            mounts.append(f"{REPO_ROOT}:{CONTAINER_SRC}/qwen_pretrain")
            exports.append(("PYTHONPATH", CONTAINER_SRC))

    files: dict[str, str] = {}
    banner = off_benchmark_banner(recipe)
    p = recipe.parallel
    summary = [
        f"qwen-pretrain launch: recipe {recipe.name}, backend {args.backend}, launcher {args.launcher}",
        *([banner] if banner else []),
        f"layout: {recipe.gpus} {_devices(args.backend, use_gpus)} = {nodes} node(s) x {per_node}; "
        f"TP{p.tp} PP{p.pp} VPP{p.vpp or '-'} CP{p.cp} EP{p.ep} SP{'on' if p.sequence_parallel else 'off'} "
        f"DP{recipe.data_parallel_size}; GBS {recipe.training.global_batch_size}, seq "
        f"{recipe.training.seq_length}, seed {recipe.training.seed}, {recipe.training.train_steps} steps",
        "data: " + ("mock" if data.mock else " ".join(data.data_path_args())),
    ]
    opts = ExecutorOptions(
        kind=("direct" if args.launcher != "nemo-run" else args.executor), nodes=nodes,
        procs_per_node=per_node, use_gpus=use_gpus, job_dir=run_dir, account=args.account,
        partition=args.partition, time=args.time, container_image=container,
        container_mounts=tuple(mounts), env=dict(exports),
    )
    if args.launcher == "nemo-run" and args.executor == "slurm" and not args.account:
        raise UserError("--executor slurm: nemo-run's SlurmExecutor needs --account")
    if args.launcher == "nemo-run" and args.executor == "local" and nodes > 1:
        raise UserError(f"--executor local runs one node, not {nodes}: use --executor slurm or --launcher torchrun")

    # What every process runs.
    if args.backend == "mcore":
        entry = Entry(python, tuple(_train_args(args, recipe, data, run_dir)), module=TRAIN_MODULE)
    elif args.backend == "megatron-lm":
        entry = Entry(python, tuple(megatron_lm_args(recipe, data)),
                      script=f"{args.megatron_lm_dir}/pretrain_gpt.py")
    elif args.backend == "mindspeed":
        script_path = f"{run_dir}/mindspeed_pretrain_{recipe.name}.sh"
        run = MindSpeedRun(tokenizer_dir=str(data.tokenizer_dir), load=args.load, save=args.save,
                           mindspeed_llm_dir=args.mindspeed_llm_dir, cann_set_env=args.cann_set_env, python=python)
        files[script_path] = render_mindspeed_script(recipe, data, run, comments=[f"# {s}" for s in summary])
        # torchrun's --no-python runs the bash script itself as every rank.
        entry = Entry(python, (script_path,), script="--no-python")
    else:
        nemo_path = f"{run_dir}/nemo_pretrain_{recipe.name}.py"
        files[nemo_path] = render_nemo_script(recipe, data, opts, comments=[f"# {s}" for s in summary])
        entry = Entry(python, ("--executor", "direct"), script=nemo_path)

    if args.launcher == "torchrun":
        assert node is not None
        # Our trainer's GPU processes get its run settings' environment (the Slurm script
        # exports the same list).
        env = run_settings(recipe, "cuda").env if args.backend == "mcore" and use_gpus else {}
        return Rendered(summary, files, torchrun_command(node, entry), env=env)
    if args.launcher == "slurm":
        job = SlurmJob(
            job_name=job_name, nodes=nodes, procs_per_node=per_node, use_gpus=use_gpus, log_dir=run_dir,
            time=args.time, partition=args.partition, account=args.account, container_image=container,
            container_mounts=tuple(mounts), container_workdir=run_dir if container else None,
            exports=tuple(exports), task_style="per-gpu" if args.backend == "nemo" else "torchrun",
            comments=tuple(summary),
        )
        if args.backend == "mindspeed":  # NPUs are a generic resource, not GPUs
            job = dataclasses.replace(job, use_gpus=False, gres=f"npu:{per_node}")
        sbatch_path = f"{run_dir}/{job_name}.sbatch"
        files[sbatch_path] = render_sbatch(job, entry.argv())
        return Rendered(summary, files, ["sbatch", "--parsable", sbatch_path], submit=True, slurm_job=job)
    # nemo-run
    if args.backend == "nemo":
        nemo_path = entry.script
        assert nemo_path is not None
        return Rendered(summary, files, [python, nemo_path, "--executor", args.executor])
    script_path = f"{run_dir}/nemo_run_{job_name}.py"
    files[script_path] = render_script_task(
        title=f"nemo-run launch of recipe '{recipe.name}' on backend {args.backend} (rendered by qwen-pretrain)",
        comments=summary, module=entry.module, script=entry.script, args=list(entry.args), opts=opts,
        experiment_name=job_name,
    )
    return Rendered(summary, files, [python, script_path, "--executor", args.executor])


def print_dry_run(r: Rendered) -> None:
    for line in r.summary:
        print(f"# {line}")
    for path, text in r.files.items():
        print(f"# ---- would write {path}")
        print(text.rstrip("\n"))
        print(f"# ---- end of {path}")
    if r.env:
        print("# with the environment (where not already set): " + " ".join(f"{k}={v}" for k, v in r.env.items()))
    print("# would run:")
    print(shlex.join(r.command))


def write_files(files: dict[str, str]) -> None:
    for path, text in files.items():
        executable = Path(path).suffix in (".sbatch", ".py", ".sh")
        atomic_write_text(path, text, mode=0o755 if executable else None)


def cmd_launch(args: argparse.Namespace) -> int:
    rendered = render(args)
    if args.dry_run:
        print_dry_run(rendered)
        return 0
    for line in rendered.summary:
        print(line, file=sys.stderr)
    write_files(rendered.files)
    if rendered.submit:
        assert rendered.slurm_job is not None
        job_id = submit(Path(rendered.command[-1]))
        print(f"submitted Slurm job {job_id}; log: {rendered.slurm_job.log_path(job_id)}")
        return 0
    print("running: " + shlex.join(rendered.command), file=sys.stderr)
    env = with_defaults(os.environ, rendered.env) if rendered.env else None
    return subprocess.run(rendered.command, env=env).returncode
