"""Real Slurm: a one-node slurmctld + slurmd on localhost (Debian's slurm-wlm and munge,
installed with apt-get when absent, root only), jobs submitted by `qwen-pretrain launch
--launcher slurm` and by the sbatch renderer. pyxis/enroot do not exist here, so these jobs run
without a container (`--cpu` / `--no-container`); the container lines of the script are checked
in test_launch_render.py.

The daemons use their own config, state, ports and munge socket under a temporary directory and
are stopped at the end of the session.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qwen_pretrain.launch.cli import main
from qwen_pretrain.launch.slurm import SlurmJob, render_sbatch, submit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_slurm_installed() -> None:
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("slurm-wlm/munge are absent and cannot be installed (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], check=True, env=env,
                   capture_output=True)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """SLURM_CONF of a running one-node cluster on this host; daemons stopped afterwards."""
    _ensure_slurm_installed()
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname()
    cpus = os.cpu_count() or 2
    for d in ("state", "spool", "log", "munge"):
        (root / d).mkdir()
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    munge_socket = root / "munge" / "munge.sock"
    conf = root / "slurm.conf"
    conf.write_text(f"""
ClusterName=qwentest
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
JobCompType=jobcomp/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = dict(os.environ, SLURM_CONF=str(conf))
    pidfiles = [root / "munge" / "munged.pid", root / "slurmctld.pid", root / "slurmd.pid"]
    try:
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={munge_socket}",
                        f"--pid-file={pidfiles[0]}", f"--log-file={root}/log/munged.log",
                        f"--seed-file={root}/munge/seed"], check=True, env=env)
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
        subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)

        def node_idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env).stdout
            return out.strip() == "idle"

        _wait(node_idle, 60, f"the Slurm node did not become idle; see {root}/log")
        yield env
    finally:
        for pidfile in reversed(pidfiles):  # only the daemons this fixture started
            if pidfile.exists():
                try:
                    os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass


def _wait_job(env: dict[str, str], job_id: str, timeout: float) -> str:
    state = {"value": "?"}

    def done() -> bool:
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
        for word in out.split():
            if word.startswith("JobState="):
                state["value"] = word.split("=", 1)[1]
        return state["value"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")

    _wait(done, timeout, f"job {job_id} still {state['value']} after {timeout}s")
    return state["value"]


def test_rendered_sbatch_runs_torchrun_with_rendezvous(slurm_cluster, monkeypatch, tmp_path):
    """The sbatch mechanics alone: MASTER_ADDR from the allocation, c10d rendezvous, 2 processes."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    job = SlurmJob(job_name="rdzv", nodes=1, procs_per_node=2, use_gpus=False, log_dir=str(tmp_path), time="00:05:00")
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nprint('probe', os.environ['RANK'], os.environ['WORLD_SIZE'])\n")
    script = tmp_path / "rdzv.sbatch"
    script.write_text(render_sbatch(job, [sys.executable, str(probe)]))
    job_id = submit(script)
    state = _wait_job(slurm_cluster, job_id, 120)
    log = Path(job.log_path(job_id)).read_text()
    assert state == "COMPLETED", log[-3000:]
    host = socket.gethostname()
    assert f"1 node(s), rendezvous {host}:" in log  # MASTER_ADDR: the allocation's first node
    assert sorted(line for line in log.splitlines() if line.startswith("probe")) == ["probe 0 2", "probe 1 2"]


@pytest.mark.skipif(importlib.util.find_spec("qwen_pretrain.training.cli") is None,
                    reason="the mcore trainer (training/cli.py, trainer issue) has not landed yet")
def test_launch_slurm_tiny_recipe_log_parses(slurm_cluster, monkeypatch, tmp_path, capsys):
    """`launch --launcher slurm` submits a 2-process CPU job of qwen3_tiny through our trainer;
    the benchmarks parser reads its log."""
    from qwen_pretrain.benchmarks.runs import parse_run

    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    run_dir = tmp_path / "run"
    rc = main(["launch", "--recipe", "qwen3_tiny", "--backend", "mcore", "--launcher", "slurm", "--cpu",
               "--nodes", "1", "--gpus-per-node", "2", "--mock-data", "--train-steps", "25",
               "--time", "00:10:00", "--run-dir", str(run_dir)])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("submitted Slurm job ")
    job_id = out.split()[3].rstrip(";")
    log = out.strip().split("log: ")[1]
    assert log == f"{run_dir}/qwen3_tiny-mcore-{job_id}.log"
    state = _wait_job(slurm_cluster, job_id, 480)
    assert state == "COMPLETED", Path(log).read_text()[-3000:]
    result = parse_run(log)
    assert result.usable, result.reason
    assert result.last_step is not None and result.steps >= 25
    assert result.final_loss is not None and math.isfinite(result.final_loss)
    assert result.tokens_per_sec_per_gpu_mean and result.tokens_per_sec_per_gpu_mean > 0
