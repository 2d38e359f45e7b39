"""Slurm: render an sbatch script for a job, submit it, report the job id and the log path.

One srun task per node runs torchrun (c10d rendezvous on the first node of the allocation), or,
for NeMo 2, one srun task per GPU as NeMo's own Slurm executor does (Lightning reads the Slurm
variables). GPU jobs run in a container through pyxis/enroot (`--container-image` on srun);
CPU jobs and `--no-container` run in the environment of the node.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qwen_pretrain.recipes import UserError
from qwen_pretrain.training.run_settings import GPU_ENVIRONMENT

DEFAULT_IMAGE = "nvcr.io/nvidia/nemo:25.09"

# The GPU processes' environment, the same the torchrun launcher exports (one list, with why
# each is set, in training/run_settings.py). Site settings win: each default applies only when
# the variable is unset.
NCCL_DEFAULTS = tuple(GPU_ENVIRONMENT.items())


@dataclass(frozen=True)
class SlurmJob:
    job_name: str
    nodes: int
    procs_per_node: int  # GPUs per node (CPU jobs: processes per node)
    use_gpus: bool
    log_dir: str
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    exclusive: bool = True
    container_image: str | None = None
    container_mounts: tuple[str, ...] = ()
    container_workdir: str | None = None
    exports: tuple[tuple[str, str], ...] = ()
    # "torchrun": one task per node starting torchrun; "per-gpu": one task per GPU (NeMo/Lightning).
    task_style: str = "torchrun"
    comments: tuple[str, ...] = ()
    # Accelerators that are not GPUs, requested as a generic resource (Ascend NPUs: "npu:8").
    gres: str | None = None

    @property
    def output_pattern(self) -> str:
        return f"{self.log_dir}/%x-%j.log"

    def log_path(self, job_id: str) -> str:
        return self.output_pattern.replace("%x", self.job_name).replace("%j", job_id)


def _torchrun_line(job: SlurmJob, entry_argv: list[str]) -> str:
    python, rest = entry_argv[0], entry_argv[1:]
    head = [
        shlex.quote(python), "-m", "torch.distributed.run",
        "--nnodes", '"$SLURM_NNODES"',
        "--nproc-per-node", str(job.procs_per_node),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", '"$MASTER_ADDR:$MASTER_PORT"',
        "--rdzv-id", '"$SLURM_JOB_ID"',
    ]
    return " ".join(head + [shlex.quote(a) for a in rest])


def render_sbatch(job: SlurmJob, entry_argv: list[str]) -> str:
    """The sbatch script that runs `entry_argv` on every process of the allocation."""
    if job.task_style not in ("torchrun", "per-gpu"):
        raise ValueError(job.task_style)
    tasks = 1 if job.task_style == "torchrun" else job.procs_per_node
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job.job_name}", f"#SBATCH --nodes={job.nodes}",
             f"#SBATCH --ntasks-per-node={tasks}"]
    if job.gres:
        lines.append(f"#SBATCH --gres={job.gres}")
    elif job.use_gpus:
        lines.append(f"#SBATCH --gpus-per-node={job.procs_per_node}")
    else:
        lines.append(f"#SBATCH --cpus-per-task={job.procs_per_node if tasks == 1 else 1}")
    if job.exclusive:
        lines.append("#SBATCH --exclusive")
    lines.append(f"#SBATCH --time={job.time}")
    if job.partition:
        lines.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        lines.append(f"#SBATCH --account={job.account}")
    lines.append(f"#SBATCH --output={job.output_pattern}")
    lines += ["", *(f"# {c}" for c in job.comments), "set -euo pipefail", ""]
    lines += [
        "# The first node of the allocation hosts the rendezvous.",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_ADDR",
        'export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}',
        'export NNODES=$SLURM_NNODES',
        f"export GPUS_PER_NODE={job.procs_per_node}",
    ]
    if job.use_gpus:
        lines += [f"export {k}=${{{k}:-{v}}}" for k, v in NCCL_DEFAULTS]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in job.exports]
    srun = ["srun", f"--ntasks-per-node={tasks}"]
    if job.container_image:
        srun.append(f"--container-image={shlex.quote(job.container_image)}")
        if job.container_mounts:
            srun.append(f"--container-mounts={shlex.quote(','.join(job.container_mounts))}")
        if job.container_workdir:
            srun.append(f"--container-workdir={shlex.quote(job.container_workdir)}")
    if job.task_style == "torchrun":
        command = _torchrun_line(job, entry_argv)
    else:
        command = " ".join(shlex.quote(a) for a in entry_argv)
    lines += ["", 'echo "job $SLURM_JOB_ID: $NNODES node(s), rendezvous $MASTER_ADDR:$MASTER_PORT"',
              " ".join(srun) + " \\", f"  {command}", ""]
    return "\n".join(lines)


def check_container(image: str | None) -> None:
    """A local squashfs image must exist before the job is queued."""
    if image and (image.endswith(".sqsh") or image.startswith(("/", "./"))) and not Path(image).exists():
        raise UserError(f"--container {image}: no such file; pass an existing .sqsh or a registry image")


def submit(script_path: Path) -> str:
    """Submit with sbatch; the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("sbatch not found on PATH: run `launch --launcher slurm` on a Slurm login node")
    proc = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"sbatch {script_path} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    match = re.match(r"\s*(\d+)", proc.stdout)
    if not match:
        raise UserError(f"sbatch {script_path}: unexpected answer {proc.stdout.strip()!r}")
    return match.group(1)
