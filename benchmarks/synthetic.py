"""Synthetic training logs in every supported format, for tests, demos and the parsing benchmark.

Each `*_line` function prints one step the way that framework does (field names, order, number
formats: NeMo's `{:.4}`, Megatron-LM's fixed-width `{:8d}` / `{:.6E}`, nanotron's human format
with K/M suffixes). `write_run` writes a whole run: a start-up header with the format's markers,
a slow first step, a loss that falls, a checkpoint-save spike, and noise lines between steps.
`write_sized_run` writes a log of a given size, all steps or steps spread through noise.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from qwen_pretrain.benchmarks.logparse import OURS_LOG_MARKER


@dataclass(frozen=True)
class Step:
    step: int
    total: int  # NeMo prints iteration i/(total-1), Megatron-LM and nanotron i/total
    loss: float
    step_time_s: float
    global_batch_size: int
    seq_length: int
    gpus: int
    lr: float = 1.754e-4
    val_loss: float | None = None
    tokens_per_sec: float | None = None  # printed value; default: derived from the others
    tflops: float | None = None  # printed value; default: 6 x 8e9 FLOPs per token

    @property
    def tokens_per_sec_per_gpu(self) -> float:
        if self.tokens_per_sec is not None:
            return float(self.tokens_per_sec)
        return self.seq_length * self.global_batch_size / self.step_time_s / self.gpus

    @property
    def consumed_samples(self) -> int:
        return (self.step + 1) * self.global_batch_size  # counted after the step, as in the logs

    @property
    def tflops_per_gpu(self) -> float:
        if self.tflops is not None:
            return float(self.tflops)
        return self.tokens_per_sec_per_gpu * 6 * 8e9 / 1e12  # an 8B-parameter model, for show


def nemo_line(s: Step, timestamp: str = "2025-10-17T11:33:02+08:00", extra: str = "") -> str:
    """NeMo 2's step line; `extra` is appended (our trainer adds `| tflops_per_gpu: ...`)."""
    parts = [
        f"Training epoch 0, iteration {s.step}/{s.total - 1}",
        f"lr: {s.lr:.4}",
        f"global_batch_size: {s.global_batch_size}",
        f"global_step: {s.step}",
        f"reduced_train_loss: {s.loss:.4}",
        f"train_step_timing in s: {s.step_time_s:.4}",
        f"tokens_per_sec_per_gpu: {s.tokens_per_sec_per_gpu:.4}",
        f"consumed_samples: {s.consumed_samples}",
    ]
    if s.val_loss is not None:
        parts.append(f"val_loss: {s.val_loss:.4}")
    prefix = f"[{timestamp}] " if timestamp else ""
    return prefix + " | ".join(parts) + extra


def ours_line(s: Step) -> str:
    """Our trainer's line, printed by the trainer's own formatter (`training/train_log.py`)."""
    from qwen_pretrain.training import train_log

    return train_log.nemo_line(train_log.StepMetrics(
        step=s.step, train_steps=s.total, lr=s.lr, global_batch_size=s.global_batch_size, loss=s.loss,
        step_time_s=s.step_time_s, tokens_per_sec_per_gpu=s.tokens_per_sec_per_gpu,
        consumed_samples=s.consumed_samples, val_loss=s.val_loss, tflops_per_gpu=s.tflops_per_gpu,
    ))


def megatron_line(s: Step, timestamp: str = "2025-10-17 11:33:02", gbs_key: str = "global batch size",
                  seqlen: bool = False) -> str:
    """Megatron-LM's `training_log` line (Megatron-Bridge prints the same fields)."""
    line = f" [{timestamp}]" if timestamp else ""
    line += f" iteration {s.step:8d}/{s.total:8d} |"
    line += f" consumed samples: {s.consumed_samples:12d} |"
    line += f" elapsed time per iteration (ms): {s.step_time_s * 1000:.1f} |"
    line += f" throughput per GPU (TFLOP/s/GPU): {s.tflops_per_gpu:.1f} |"
    line += f" learning rate: {s.lr:.6E} |"
    line += f" {gbs_key}: {s.global_batch_size:5d} |"
    line += f" lm loss: {s.loss:.6E} |"
    line += " loss scale: 1.0 |"
    line += " grad norm: 1.234 |"
    if seqlen:
        line += f" actual seqlen: {s.seq_length:5d} |"
    line += " number of skipped iterations:   0 |"
    line += " number of nan iterations:   0 |"
    return line


def mindspeed_line(s: Step) -> str:
    """MindSpeed-LLM / ModelLink: Megatron's line with `gloabl batch size` and `actual seqlen`."""
    return megatron_line(s, timestamp="", gbs_key="gloabl batch size", seqlen=True)


def human_format(num: float) -> str:
    """nanotron's `human_format`: 3 significant digits and a K/M/B/T suffix."""
    if abs(num) < 1:
        return f"{num:.3g}"
    sizes = ["", "K", "M", "B", "T", "P", "E"]
    num = float(f"{num:.3g}")
    magnitude = 0
    while abs(num) >= 1000 and magnitude < len(sizes) - 1:
        magnitude += 1
        num /= 1000.0
    return f"{num:f}".rstrip("0").rstrip(".") + sizes[magnitude]


def nanotron_line(s: Step, timestamp: str = "10/17 11:33:02") -> str:
    """nanotron's step line, with its ANSI-dimmed logging prefix and human-format numbers."""
    tps = s.tokens_per_sec_per_gpu
    items = [
        f"iteration: {s.step} / {s.total}",
        f"consumed_tokens: {human_format(s.consumed_samples * s.seq_length)}",
        f"elapsed_time_per_iteration_ms: {human_format(s.step_time_s * 1000)}",
        f"tokens_per_sec: {human_format(tps * s.gpus)}",
        f"tokens_per_sec_per_gpu: {human_format(tps)}",
        f"global_batch_size: {human_format(s.global_batch_size)}",
        f"lm_loss: {human_format(s.loss)}",
        f"lr: {human_format(s.lr)}",
        f"model_tflops_per_gpu: {human_format(s.tflops_per_gpu)}",
        f"hardware_tflops_per_gpu: {human_format(s.tflops_per_gpu)}",
        "grad_norm: 1.23",
    ]
    return f"\x1b[2;3m{timestamp} [INFO|DP=0|PP=0|TP=0]\x1b[0m: " + " | ".join(items)


LINE_OF_FORMAT = {
    "nemo": nemo_line,
    "ours": ours_line,
    "megatron": megatron_line,
    "bridge": megatron_line,
    "mindspeed": mindspeed_line,
    "nanotron": nanotron_line,
}

HEADERS = {
    "nemo": ["[NeMo I 2025-10-17 11:30:01 nemo_logging:393] Experiments will be logged at /results/qwen3_8b_pretraining",
             "GPU available: True (cuda), used: True"],
    "ours": [f"[{OURS_LOG_MARKER}] recipe qwen3_tiny, world 2"],
    "megatron": ["using world size: 8, data-parallel size: 2, context-parallel size: 1, tensor-model-parallel size: 4",
                 "------------------------ arguments ------------------------",
                 "  seq_length ...................................... 4096",
                 "  world_size ...................................... 8",
                 "-------------------- end of arguments ---------------------"],
    "bridge": ["INFO:megatron.bridge.training.setup:Setting up the training run",
               "INFO:megatron.bridge.training.train:Starting training loop"],
    "mindspeed": ["[INFO] import mindspeed_llm: patching megatron for Ascend NPU"],
    "nanotron": ["\x1b[2;3m10/17 11:30:01 [INFO|DP=0|PP=0|TP=0]\x1b[0m: Config: ..."],
}

NOISE = [
    "[NeMo W 2025-10-17 11:33:02 nemo_logging:405] /usr/local/lib/python3.12/dist-packages/torch/utils/data/"
    "dataloader.py:624: UserWarning: This DataLoader will create 8 worker processes in total.",
    "Epoch 0:  53%|█████▎    | 528/999 [21:29<19:10, v_num=0, reduced_train_loss=3.060, global_step=528.0]",
    "[rank3]:[W1017 11:33:02.123456 ProcessGroupNCCL.cpp:4561] [PG ID 0 PG GUID 0 Rank 3] using GPU 3",
]

# What big multi-GPU logs are mostly made of: NCCL INFO lines, rank-prefixed warnings, `\r` progress bars.
BIG_LOG_NOISE = [
    "node-17:12345:12380 [3] NCCL INFO Channel 07/0 : 3[3] -> 4[4] via P2P/CUMEM/read",
    "node-17:12345:12380 [3] NCCL INFO Connected all rings, use ring PXN 0 GDR 1",
    "[rank5]:[W1017 11:33:02.123456 ProcessGroupNCCL.cpp:4561] [PG ID 0 PG GUID 0 Rank 5] using GPU 5 as device",
    "[NeMo W 2025-10-17 11:33:02 nemo_logging:405] /usr/local/lib/python3.12/dist-packages/lightning/pytorch/"
    "trainer/connectors/logger_connector/result.py:431: It is recommended to use `self.log(..., sync_dist=True)`",
    "\rEpoch 0:  53%|\u2588\u2588\u2588\u2588\u2588\u258e    | 528/999 [21:29<19:10, v_num=0, "
    "reduced_train_loss=3.060, global_step=528.0, consumed_samples=16928.0]",
    "[default3]:[NeMo I 2025-10-17 11:33:02 utils:661] Setting up optimizer with config OptimizerConfig(lr=0.0003)",
]


def run_steps(n_steps: int, seq_length: int = 4096, global_batch_size: int = 32, gpus: int = 8,
              first: int = 1, total: int | None = None, seed: int = 0,
              base_step_time: float = 2.443) -> Iterator[Step]:
    """A plausible run: slow first step, loss falling from ~11 towards ~3, a save spike every 100 steps."""
    rng = random.Random(seed)
    total = total if total is not None else first + n_steps - 1
    for i in range(n_steps):
        step = first + i
        t = base_step_time * (1 + 0.01 * rng.uniform(-1, 1))
        if i == 0:
            t *= 6  # compilation, NCCL set-up, first data loads
        elif step % 100 == 0:
            t *= 3  # checkpoint save
        loss = 3.0 + 8.0 * math.exp(-step / 150) + 0.02 * rng.uniform(-1, 1)
        yield Step(step, total, loss, t, global_batch_size, seq_length, gpus)


def write_run(path: Path, fmt: str, steps: list[Step] | Iterator[Step], noise_every: int = 0) -> Path:
    """Write a log of `fmt` with its header, the steps and, every `noise_every` steps, noise lines."""
    line = LINE_OF_FORMAT[fmt]
    with open(path, "w", encoding="utf-8") as f:
        for h in HEADERS[fmt]:
            f.write(h + "\n")
        for i, s in enumerate(steps):
            f.write(line(s) + "\n")
            if noise_every and i % noise_every == 0:
                f.write("\n".join(NOISE) + "\n")
    return path


def write_sized_run(path: Path, fmt: str, steps: Iterable[Step], size_bytes: int,
                    noise: Sequence[str] = (), seed: int = 0) -> int:
    """Write a log of `fmt` of about `size_bytes` (header included); returns its number of steps.

    Without `noise` every line after the header is a step, and steps are written until the size
    is reached (so `steps` must not run out first). With `noise`, all `steps` are written, spread
    evenly through noise lines drawn at random from `noise` that fill the log to its size."""
    line = LINE_OF_FORMAT[fmt]
    header = "".join(h + "\n" for h in HEADERS[fmt]).encode()
    with open(path, "wb") as f:
        f.write(header)
        if not noise:
            return _write_steps_to_size(f, line, steps, size_bytes - len(header))
        return _write_steps_in_noise(f, line, list(steps), size_bytes - len(header), noise, seed)


def _write_steps_to_size(f, line, steps: Iterable[Step], size_bytes: int) -> int:
    written = count = 0
    chunk: list[bytes] = []
    for s in steps:
        if written >= size_bytes:
            break
        encoded = (line(s) + "\n").encode()
        chunk.append(encoded)
        written += len(encoded)
        count += 1
        if len(chunk) >= 20000:  # few large writes: the benchmark writes logs of gigabytes
            f.write(b"".join(chunk))
            chunk.clear()
    f.write(b"".join(chunk))
    return count


def _write_steps_in_noise(f, line, steps: list[Step], size_bytes: int, noise: Sequence[str],
                          seed: int) -> int:
    rng = random.Random(seed)
    # One block of random noise lines, written in turn from where the last piece ended, whole
    # lines only; doubled so that a piece may wrap around its end.
    block = [(rng.choice(noise) + "\n").encode() for _ in range(4000)]
    block_bytes = len(b"".join(block))
    doubled = b"".join(block) * 2
    ends = list(itertools.accumulate(len(b) for b in block + block))
    written = start = 0
    for i, s in enumerate(steps):
        encoded = (line(s) + "\n").encode()
        f.write(encoded)
        written += len(encoded)
        target = size_bytes * (i + 1) // len(steps)
        while written < target:
            want = start + min(target - written, block_bytes)
            end = ends[bisect.bisect_left(ends, want)]
            f.write(doubled[start:end])
            written += end - start
            start = end % block_bytes
    return len(steps)
