"""Everything megatron-core needs to run on CPU with gloo, in one place.

megatron-core assumes CUDA throughout: it allocates on `device="cuda"` or
`torch.cuda.current_device()`, keeps its tensor-parallel RNG streams in the CUDA generator,
checks `param.type() == "torch.cuda.FloatTensor"`, synchronises streams and events, and its MoE
alltoall dispatcher expects split sizes to come back from the GPU as numpy. None of that exists
on a machine without a GPU. `enable_cpu_support()` bridges exactly those points:

1. `torch.cuda` stand-ins: `current_device`, `device_count`, `set_device`, `synchronize`,
   `Stream`/`Event`/`current_stream`/`default_stream`/`stream`, `empty_cache`, `nvtx`.
2. The CUDA RNG used by `tensor_parallel.random` (its tracker of model-parallel seeds) is mapped
   to the CPU generator. `torch.manual_seed` itself calls `torch.cuda.manual_seed_all`, so the
   stand-in for `torch.cuda.manual_seed` seeds the CPU generator directly (never through
   `torch.manual_seed`, which would recurse).
3. A `TorchFunctionMode` rewrites every `device=` that names CUDA (a string, a `torch.device`,
   or the integer `current_device()` returns) to CPU, turns `Tensor.cuda()` into identity, and
   answers `Tensor.type()` with the `torch.cuda.*Tensor` names the optimizers check for. The
   autograd engine drops modes while it runs backward, so custom Functions' backward re-enter it.
4. `fusions`/`transformer.utils.get_default_causal_mask` builds its mask on "cuda": covered by 3.
5. `moe_utils` names `te_general_gemm` without defining it when Transformer Engine is absent.
6. The alltoall dispatcher's `maybe_move_tensor_to_cpu(..., as_numpy=True)` skips CPU tensors,
   so split sizes stay tensors; the stand-in converts them to numpy as on GPU.
7. Checkpoint loading with torch's AdamW (the fallback without Apex/TE): `init_torch_adam_state`
   and `untie_torch_adam_steps`, called by `checkpoint.load_checkpoint` (no-ops with Apex/TE).
8. torch_dist checkpoint files are written in-process, not by forked writer processes fed
   through a spawned multiprocessing Manager (which re-imports the caller's `__main__`).

Usage (the trainer and `parallel.init_parallel` call it for you):

    from qwen_pretrain.training.cpu_support import enable_cpu_support
    enable_cpu_support()   # no-op when CUDA is available; idempotent

It never changes anything when `torch.cuda.is_available()` is true (unless forced: a process
asked to run on CPU on a GPU host), so GPU runs use megatron-core untouched. Call it before
building models, optimizers or dispatchers.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

_ENABLED = False
_MODE: Any = None


def enable_cpu_support(*, force: bool = False) -> bool:
    """Patch torch.cuda / megatron-core for CPU; returns True when the patches are active.

    `force=True` patches even where CUDA is visible: a process asked to run on CPU (`--device
    cpu` on a GPU host) must keep megatron-core's own CUDA allocations on the CPU too.
    """
    global _ENABLED, _MODE
    if _ENABLED:
        return True
    import torch

    if torch.cuda.is_available() and not force:
        return False
    _patch_torch_cuda(torch)
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # stays pushed for the life of the process
    _mode_in_custom_backwards(type(_MODE))
    _patch_megatron()
    _ENABLED = True
    return True


# --- 1 and 2: torch.cuda stand-ins ---------------------------------------------------------


class _Stream:
    """A stream that is always done; CPU work is synchronous."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _Event:
        return event or _Event()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _Event:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._time = 0.0

    def record(self, stream: Any = None) -> None:
        import time

        self._time = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _Event) -> float:
        return (end._time - self._time) * 1000.0


class _Nvtx:
    @staticmethod
    def range_push(msg: str) -> None:
        pass

    @staticmethod
    def range_pop() -> None:
        pass

    @staticmethod
    @contextlib.contextmanager
    def range(msg: str, *args: Any, **kwargs: Any):
        yield


def _patch_torch_cuda(torch: Any) -> None:
    cuda = torch.cuda

    def manual_seed(seed: int) -> None:
        # Not torch.manual_seed: that calls torch.cuda.manual_seed_all and would come back here.
        torch.default_generator.manual_seed(int(seed))

    def get_rng_state(device: Any = "cuda") -> Any:
        return torch.get_rng_state()

    def set_rng_state(state: Any, device: Any = "cuda") -> None:
        torch.set_rng_state(state)

    stream = _Stream()
    patches = {
        "current_device": lambda: 0,
        "device_count": lambda: 1,
        "set_device": lambda device: None,
        "synchronize": lambda device=None: None,
        "empty_cache": lambda: None,
        "Stream": _Stream,
        "Event": _Event,
        "current_stream": lambda device=None: stream,
        "default_stream": lambda device=None: stream,
        "stream": lambda s=None: contextlib.nullcontext(),
        "nvtx": _Nvtx,
        "manual_seed": manual_seed,
        "get_rng_state": get_rng_state,
        "set_rng_state": set_rng_state,
        "memory_allocated": lambda device=None: 0,
        "max_memory_allocated": lambda device=None: 0,
        "memory_reserved": lambda device=None: 0,
        "reset_peak_memory_stats": lambda device=None: None,
    }
    for name, value in patches.items():
        setattr(cuda, name, value)
    cuda.random.get_rng_state = get_rng_state
    cuda.random.set_rng_state = set_rng_state


# --- 3 and 4: CUDA devices become CPU --------------------------------------------------------


def _cpu_if_cuda(device: Any) -> Any:
    import torch

    if isinstance(device, bool):
        return device
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _make_mode() -> type:
    import torch
    from torch.overrides import TorchFunctionMode

    tensor_to = torch.Tensor.to
    tensor_cuda = torch.Tensor.cuda
    tensor_type = torch.Tensor.type

    class CudaToCpuMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is tensor_cuda:
                return args[0]
            if func is tensor_type and len(args) == 1 and not kwargs:
                name = func(*args)
                return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
            if "device" in kwargs:
                kwargs["device"] = _cpu_if_cuda(kwargs["device"])
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
            if func is tensor_to and len(args) > 1:
                args = (args[0], _cpu_if_cuda(args[1]), *args[2:])
            return func(*args, **kwargs)

    return CudaToCpuMode


def _CudaToCpuMode() -> Any:  # noqa: N802 - reads like the class it builds
    return _make_mode()()


def _mode_in_custom_backwards(mode_class: type) -> None:
    """Run custom autograd Functions' backward under the mode too.

    The autograd engine runs backward with an empty torch-function mode stack, so megatron's
    own backward passes (e.g. the MoE all-to-all's, which allocates on `current_device()`)
    would see CUDA devices again. The engine calls `BackwardCFunction.apply` by name.
    """
    from torch.autograd.function import BackwardCFunction

    original = BackwardCFunction.apply

    def apply(self: Any, *args: Any) -> Any:
        with mode_class():
            return original(self, *args)

    BackwardCFunction.apply = apply


# --- 5 and 6: megatron-core's MoE without Transformer Engine ---------------------------------


def _patch_megatron() -> None:
    import torch
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.detach().cpu().numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    _write_checkpoints_in_process()
    _load_model_space_state_without_step()

    # The RNG tracker warns when the CPU generator moves inside a CUDA RNG fork; here the two
    # are the same generator, so the warning fires on every dropout-free layer init and says
    # nothing. The fork still saves and restores the state correctly.
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )


# --- 8: checkpoint files written in-process -------------------------------------------------


def _write_checkpoints_in_process() -> None:
    """Write torch_dist checkpoint files from the training process instead of worker processes.

    megatron-core's `FileSystemWriterAsync` forks writer processes (to overlap GPU->CPU copies
    with I/O) and collects their results through a spawned Manager process. On CPU nothing is
    gained, forking a process that runs gloo threads is fragile, and the spawned Manager
    re-runs an unguarded `__main__` (a save then never returns). Writes here are synchronous.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.dist_checkpointing.strategies.base import AsyncSaveShardedStrategy
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    def write_in_process(transform_list, use_msc, rank, write_buckets, global_results_queue):
        results: Any = {}
        for i, bucket in enumerate(write_buckets):
            local_results: queue.Queue = queue.Queue()
            count: queue.Queue = queue.Queue()
            count.put(i)
            FileSystemWriterAsync.write_preloaded_data(
                transform_list, i, bucket, local_results, count, True, use_msc=use_msc
            )
            idx, out = local_results.get()
            if isinstance(out, Exception):
                results = out
                break
            results[idx] = out
        global_results_queue.put(results)

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(write_in_process)
    # The results then travel in-process too: no multiprocessing Manager (a spawned server
    # process that re-imports the caller's __main__, which hangs unguarded scripts).
    filesystem_async._results_queue = queue.Queue()

    def save_in_process(self: Any, sharded_state_dict: Any, checkpoint_dir: Any) -> None:
        self.async_save(sharded_state_dict, checkpoint_dir).execute_sync()

    # A synchronous save runs its request in this process (megatron-core 0.16 does so itself;
    # 0.14 hands it to a forked caller process, where the in-process results above would be lost).
    AsyncSaveShardedStrategy.save = save_in_process


# --- 7: loading optimizer state into torch's AdamW (no Apex/TE) ------------------------------


def _load_model_space_state_without_step() -> None:
    """Load model-space optimizer checkpoints into torch's AdamW, whose state holds `step`.

    The model-space format (`fully_sharded_model_space`, the format megatron-core 0.14 writes)
    leaves torch's per-parameter `step` out of the tensors it restores, yet
    `_set_main_param_and_optimizer_states` copies into every key of the parameter's state, so
    `step` (created by `init_torch_adam_state`) has no source. Copy the keys that were saved;
    `untie_torch_adam_steps` restores `step` from the param groups afterwards.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    original = distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states

    def set_saved_states(self: Any, model_param: Any, tensors: dict[str, Any]) -> None:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        if "step" in state and "step" not in tensors:
            step = state.pop("step")
            try:
                original(self, model_param, tensors)
            finally:
                state["step"] = step
        else:
            original(self, model_param, tensors)

    distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states = set_saved_states


def init_torch_adam_state(optimizer: Any) -> None:
    """Give every parameter of torch's AdamW its state (moments and `step`) before a load.

    Without Apex or Transformer Engine, megatron-core falls back to `torch.optim.AdamW`, and its
    state initialiser for checkpoint loading creates the moments but not `step`, which its own
    `DistributedOptimizer.state_dict()` then requires. No-op where Apex or TE provide Adam.
    """
    import torch
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in chained:
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if "step" not in state:
                    state["exp_avg"] = state.get("exp_avg", torch.zeros_like(p.data))
                    state["exp_avg_sq"] = state.get("exp_avg_sq", torch.zeros_like(p.data))
                    state["step"] = torch.tensor(0.0)


def untie_torch_adam_steps(optimizer: Any) -> None:
    """After a load, give each parameter its own AdamW `step` tensor, with the saved count.

    megatron-core's `DistributedOptimizer` (torch AdamW fallback) stores the step count in its
    param groups and, on load, hands one shared `step` tensor to every parameter, which its
    parameter-state loader then overwrites in place with the initial state's zero; torch also
    increments steps in place, so a shared tensor would advance once per parameter. Here each
    parameter gets its own 0-d tensor holding the group's saved count, as torch's AdamW keeps
    it. No-op where Apex or TE provide Adam.
    """
    import torch
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                inner.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)
