"""nemo-run: the executor part of every rendered nemo-run script, and the script for tasks that
are not NeMo recipes (our trainer, Megatron-LM's pretrain_gpt.py) wrapped in `run.Script`.

Rendered scripts import only `nemo_run` (and NeMo for NeMo recipes), never this package, so they
can be handed to anyone with an NGC NeMo container. Executors:
  local   `run.LocalExecutor(ntasks_per_node=G, launcher="torchrun")` on this node
  slurm   `run.SlurmExecutor(...)` through a LocalTunnel (run it on the login node)
  direct  no executor: the task runs in this process (under torchrun or srun)
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXECUTORS = ("local", "slurm", "direct")


@dataclass(frozen=True)
class ExecutorOptions:
    kind: str  # local | slurm | direct
    nodes: int
    procs_per_node: int
    use_gpus: bool
    job_dir: str
    account: str | None = None
    partition: str | None = None
    time: str = "04:00:00"
    container_image: str | None = None
    container_mounts: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


_EXECUTOR_TEMPLATE = '''
EXECUTOR = {options!r}


def make_executor(kind):
    """The nemo-run executor of the launch settings above; None runs the task in this process."""
    o = EXECUTOR
    if kind == "direct":
        return None
    if kind == "local":
        return run.LocalExecutor(ntasks_per_node=o["procs_per_node"], nodes=1, launcher="torchrun",
                                 env_vars=dict(o["env"]))
    return run.SlurmExecutor(
        account=o["account"], partition=o["partition"], time=o["time"], nodes=o["nodes"],
        ntasks_per_node=o["procs_per_node"], gpus_per_node=o["procs_per_node"] if o["use_gpus"] else None,
        exclusive=True, container_image=o["container_image"], container_mounts=list(o["container_mounts"]),
        env_vars=dict(o["env"]), tunnel=run.LocalTunnel(job_dir=o["job_dir"]),
    )
'''


def executor_source(opts: ExecutorOptions) -> str:
    """Python source defining EXECUTOR (the settings, a literal) and make_executor(kind)."""
    options = {
        "kind": opts.kind, "nodes": opts.nodes, "procs_per_node": opts.procs_per_node,
        "use_gpus": opts.use_gpus, "job_dir": opts.job_dir, "account": opts.account,
        "partition": opts.partition, "time": opts.time, "container_image": opts.container_image,
        "container_mounts": list(opts.container_mounts), "env": dict(opts.env),
    }
    return _EXECUTOR_TEMPLATE.format(options=options)


def cli_source(default_kind: str, experiment_name: str) -> str:
    """The `main()` shared by rendered scripts: pick the executor, dry-run, run."""
    return f'''
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executor", choices={EXECUTORS!r}, default={default_kind!r})
    parser.add_argument("--dryrun", action="store_true", help="print what nemo-run would run")
    extra_arguments(parser)
    args = parser.parse_args()
    task = build_task(args)
    if task is None:
        return 0
    executor = make_executor(args.executor)
    if executor is None:
        run.run(task, direct=True, name={experiment_name!r})
    else:
        run.run(task, executor=executor, name={experiment_name!r}, dryrun=args.dryrun)
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


_SCRIPT_TASK = '''
TASK = {task!r}


def extra_arguments(parser):
    pass


def build_task(args):
    return run.Script(path=TASK["path"], args=list(TASK["args"]), entrypoint="python", m=TASK["module"])
'''


def render_script_task(
    *, title: str, comments: list[str], module: str | None, script: str | None,
    args: list[str], opts: ExecutorOptions, experiment_name: str,
) -> str:
    """A standalone nemo-run script running `python [-m] MODULE|SCRIPT ARGS` on every process."""
    task = {"path": module or script, "module": module is not None, "args": list(args)}
    header = [f'"""{title}', "", *comments, '"""', "", "import argparse", "import sys", "",
              "import nemo_run as run", ""]
    return "\n".join(header) + executor_source(opts) + _SCRIPT_TASK.format(task=task) + cli_source(
        opts.kind, experiment_name
    )
