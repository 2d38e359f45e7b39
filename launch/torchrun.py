"""torchrun on one node of a cluster, configured the way the acceptance procedure sets a node up.

Every node of a job exports MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK and GPUS_PER_NODE, and
runs the same command; torchrun then starts GPUS_PER_NODE processes with static rendezvous. GPU
processes also get the run settings' environment (`training.run_settings.GPU_ENVIRONMENT`:
CUDA_DEVICE_MAX_CONNECTIONS=1 and NCCL settings) where the node does not set it (`with_defaults`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from qwen_pretrain.recipes import UserError

# The module every rank of our trainer runs (`python -m TRAIN_MODULE ARGS`).
TRAIN_MODULE = "qwen_pretrain.training.cli"

NODE_ENV = ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "GPUS_PER_NODE")


@dataclass(frozen=True)
class NodeEnv:
    master_addr: str
    master_port: int
    nnodes: int
    node_rank: int
    gpus_per_node: int


@dataclass(frozen=True)
class Entry:
    """What each process runs: `python -m MODULE ARGS` or `python SCRIPT ARGS`."""

    python: str
    args: tuple[str, ...]
    module: str | None = None
    script: str | None = None

    def argv(self) -> list[str]:
        target = ["-m", self.module] if self.module else [str(self.script)]
        return [self.python, *target, *self.args]


def read_node_env(
    environ: Mapping[str, str] | None = None,
    *,
    nnodes: int | None = None,
    gpus_per_node: int | None = None,
) -> NodeEnv:
    """The node's rendezvous settings; `--nodes`/`--gpus-per-node` take the place of NNODES /
    GPUS_PER_NODE. All missing or malformed variables are named in one error."""
    env = os.environ if environ is None else environ
    given = {"NNODES": nnodes, "GPUS_PER_NODE": gpus_per_node}
    values: dict[str, str] = {}
    missing, malformed = [], []
    for name in NODE_ENV:
        raw = str(given[name]) if given.get(name) is not None else env.get(name, "").strip()
        if not raw:
            missing.append(name)
        elif name != "MASTER_ADDR" and not raw.isdigit():
            malformed.append(f"{name}={raw!r} (want an integer)")
        else:
            values[name] = raw
    if missing or malformed:
        parts = []
        if missing:
            parts.append(f"missing environment variable(s) {', '.join(missing)}")
        if malformed:
            parts.append(f"malformed {', '.join(malformed)}")
        raise UserError(
            f"torchrun launcher: {'; '.join(parts)}: export all of {' '.join(NODE_ENV)} on every "
            "node (NNODES and GPUS_PER_NODE may come from --nodes / --gpus-per-node)"
        )
    node = NodeEnv(
        master_addr=values["MASTER_ADDR"],
        master_port=int(values["MASTER_PORT"]),
        nnodes=int(values["NNODES"]),
        node_rank=int(values["NODE_RANK"]),
        gpus_per_node=int(values["GPUS_PER_NODE"]),
    )
    if not 0 <= node.node_rank < node.nnodes:
        raise UserError(f"torchrun launcher: NODE_RANK={node.node_rank} must be in 0..NNODES-1={node.nnodes - 1}")
    if node.gpus_per_node < 1 or node.nnodes < 1:
        raise UserError("torchrun launcher: NNODES and GPUS_PER_NODE must be at least 1")
    return node


def torchrun_command(node: NodeEnv, entry: Entry) -> list[str]:
    """`python -m torch.distributed.run` (torchrun of the same interpreter) for this node."""
    return [
        entry.python, "-m", "torch.distributed.run",
        "--nnodes", str(node.nnodes),
        "--nproc-per-node", str(node.gpus_per_node),
        "--node-rank", str(node.node_rank),
        "--master-addr", node.master_addr,
        "--master-port", str(node.master_port),
        *entry.argv()[1:],
    ]


def with_defaults(environ: Mapping[str, str], defaults: Mapping[str, str]) -> dict[str, str]:
    """`environ` plus each of `defaults` that it does not set: a site's own value wins, as in
    the Slurm script's `export NAME=${NAME:-default}`."""
    return {**defaults, **environ}
