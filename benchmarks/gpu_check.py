"""`qwen-pretrain bench gpu-check`: is this GPU node's stack fast and right? About 10 minutes on
one H100/H200.

    qwen-pretrain bench gpu-check --dry-run        # the plan, on any machine
    qwen-pretrain bench gpu-check --out gpu_check  # on a GPU node (an NGC image: TE, megatron-core)

Five parts, each in a process of its own (a clean GPU and a time limit each); the figures go to
`OUT/gpu_check.json` and `OUT/gpu_check.md`, the logs beside them:

1. versions: GPU, driver, CUDA, torch, Transformer Engine, megatron-core, transformers.
2. ours: qwen3_0p6b on one GPU with the GPU run settings (`train --device cuda`: TE spec, bf16,
   fusions, overlap; `training/run_settings.py`), seq 4096, mock data, 30 steps. Its log goes
   through the benchmarks parser with the acceptance rule's window (steps 10..19): mean
   tokens/s/GPU, then TFLOP/s/GPU and MFU with Megatron-LM's FLOPs per token
   (`recipes.planner.flops_per_token`) and the GPU's dense BF16 peak.
3. the baseline a user would otherwise pick: the same model, steps, batch and window in plain
   `transformers` (SDPA attention, bf16 autocast over fp32 weights as the HF Trainer's `bf16`,
   `torch.compile`, fused AdamW) on the same GPU; reported as ours / baseline.
4. conversion: a random-weight Hugging Face Qwen3-0.6B (bf16 safetensors) converted to torch_dist
   by the converter (CPU, local spec).
5. load: that checkpoint in the trainer's TE-spec model on the GPU through the trainer's weights
   loader; the checkpoint's tensor keys against the model's, then logits (fp32) against
   `transformers` on the GPU.

Exit 0 when every part ran and the checks hold, 1 when one failed, 2 without CUDA (one line).
`python -m qwen_pretrain.benchmarks.gpu_check PART PLAN_JSON OUT_JSON` runs one part (what the
parent starts).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.files import atomic_write_text

PARTS = ("versions", "ours", "baseline", "convert", "load")


@dataclass(frozen=True)
class CheckPlan:
    """What the check runs. The defaults are the GPU check; a tiny recipe on CPU runs the same
    parts (without torch.compile) to test the check itself."""

    recipe: str = "qwen3_0p6b"
    device: str = "cuda"
    transformer_engine: bool = True
    steps: int = 30
    global_batch_size: int = 16
    micro_batch_size: int = 2
    seq_length: int = 4096
    skip_first: int = 10  # the acceptance rule's window: steps 10..19 of 30
    skip_last: int = 10
    compile_baseline: bool = True
    logits_tolerance: float = 1e-2  # max |logit diff|, fp32 on both sides (TF32-level GEMM noise)
    seed: int = 1234
    # Seconds per part: 10 minutes in all.
    time_limits_s: dict[str, int] = field(
        default_factory=lambda: {"versions": 30, "ours": 240, "baseline": 180, "convert": 90, "load": 60}
    )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> CheckPlan:
        return CheckPlan(**json.loads(text))


# ---------------------------------------------------------------- the commands


def train_command(plan: CheckPlan, log_dir: Path) -> list[str]:
    """Our trainer on one process (one GPU) with the plan's batch, under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "qwen_pretrain.training.cli", "--recipe", plan.recipe, "--device", plan.device,
           "--mock-data", "--tp", "1", "--pp", "1", "--cp", "1", "--ep", "1", "--etp", "1", "--no-sp",
           "--mbs", str(plan.micro_batch_size), "--gbs", str(plan.global_batch_size),
           "--seq-length", str(plan.seq_length), "--train-steps", str(plan.steps), "--eval-interval", "0",
           "--seed", str(plan.seed), "--log-dir", str(log_dir)]  # fmt: skip
    return cmd + ([] if plan.transformer_engine else ["--no-te"])


def part_command(part: str, plan_path: Path, out_path: Path) -> list[str]:
    return [sys.executable, "-m", "qwen_pretrain.benchmarks.gpu_check", part, str(plan_path), str(out_path)]


def describe_plan(plan: CheckPlan, out: Path) -> str:
    """The dry run: what each part runs, and the run settings part 2 trains with."""
    from qwen_pretrain.recipes import get_recipe
    from qwen_pretrain.training.run_settings import run_settings

    recipe = get_recipe(plan.recipe)
    settings = run_settings(recipe, plan.device, transformer_engine=plan.transformer_engine)
    limits = plan.time_limits_s
    lines = [
        f"qwen-pretrain bench gpu-check: {plan.recipe} on one {plan.device} device, seq {plan.seq_length}, "
        f"global batch {plan.global_batch_size} (micro {plan.micro_batch_size}), {plan.steps} steps, "
        f"window steps {plan.skip_first}..{plan.steps - plan.skip_last - 1}; at most {sum(limits.values())} s",
        f"1. versions ({limits['versions']} s): GPU, driver, CUDA, torch, Transformer Engine, megatron-core",
        f"2. ours ({limits['ours']} s): " + " ".join(train_command(plan, out / "ours")),
        f"   run settings: {json.dumps(settings.to_dict())}",
        f"3. baseline ({limits['baseline']} s): transformers, SDPA, bf16 autocast, "
        f"{'torch.compile, ' if plan.compile_baseline else ''}fused AdamW, the same batch and window",
        f"4. convert ({limits['convert']} s): random-weight HF {recipe.hf_name} (bf16) -> torch_dist",
        f"5. load ({limits['load']} s): the checkpoint in the trainer's {settings.layer_spec}-spec model on "
        f"{plan.device}; tensor keys compared; logits vs transformers (fp32) within {plan.logits_tolerance:g}",
        f"results: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- the parts (child processes)


def _package_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def part_versions(plan: CheckPlan) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformer_engine": _package_version("transformer-engine", "transformer_engine", "transformer-engine-cu12"),
        "megatron_core": _package_version("megatron-core", "megatron_core"),
        "transformers": _package_version("transformers"),
        "gpu": None, "driver": None,
    }  # fmt: skip
    if plan.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            out["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            pass
    return out


def _hf_config(shape: Any) -> Any:
    import transformers
    from qwen_pretrain.conversion.hf_io import hf_config_for

    cfg = hf_config_for(shape)
    return transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def part_baseline(plan: CheckPlan) -> dict[str, Any]:
    """The same model, batch and steps in plain transformers; one time per step."""
    import torch
    import transformers
    from qwen_pretrain.recipes import get_recipe

    shape = get_recipe(plan.recipe).model
    torch.manual_seed(plan.seed)
    gpu = plan.device == "cuda"
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(shape), attn_implementation="sdpa")
    model = model.to(plan.device).train()
    model.config.use_cache = False
    step_model = torch.compile(model) if plan.compile_baseline else model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=gpu)
    accum = plan.global_batch_size // plan.micro_batch_size
    generator = torch.Generator(device=plan.device).manual_seed(plan.seed)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    times, losses = [], []
    for _ in range(plan.steps):
        sync()
        start = time.perf_counter()
        total = 0.0
        for _ in range(accum):
            ids = torch.randint(0, shape.vocab_size, (plan.micro_batch_size, plan.seq_length),
                                device=plan.device, generator=generator)
            # bf16 on the GPU as ours; fp32 on CPU, as ours there.
            with torch.autocast(device_type=plan.device, dtype=torch.bfloat16, enabled=gpu):
                loss = step_model(input_ids=ids, labels=ids).loss / accum
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        losses.append(total)
    return {"step_times_s": times, "losses": losses}


def part_convert(plan: CheckPlan, work: Path) -> dict[str, Any]:
    """A random-weight HF model of the recipe (bf16 safetensors), converted to torch_dist."""
    import torch
    import transformers
    from qwen_pretrain.conversion.convert import hf_to_mcore
    from qwen_pretrain.recipes import get_recipe

    shape = get_recipe(plan.recipe).model
    torch.manual_seed(plan.seed)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(shape)).to(torch.bfloat16)
    model.save_pretrained(work / "hf", safe_serialization=True)
    del model
    start = time.perf_counter()
    hf_to_mcore(work / "hf", work / "mcore", recipe=plan.recipe, fmt="torch_dist", quiet=True)
    return {"convert_s": time.perf_counter() - start}


def part_load(plan: CheckPlan, work: Path) -> dict[str, Any]:
    """The converted checkpoint in the trainer's model on the plan's device (TE spec on a GPU
    with TE), through the trainer's weights loader; keys and logits against transformers."""
    import torch
    import transformers
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from qwen_pretrain.recipes import get_recipe
    from qwen_pretrain.training.checkpoint import load_model_weights
    from qwen_pretrain.training.checkpoint_dir import read_tracker
    from qwen_pretrain.training.model import build_model, tp1_recipe
    from qwen_pretrain.training.parallel import init_single_process
    from qwen_pretrain.training.run_settings import run_settings

    shape = get_recipe(plan.recipe).model
    recipe = tp1_recipe(shape)  # fp32, one process
    settings = run_settings(recipe, plan.device, transformer_engine=plan.transformer_engine)
    init_single_process(device=plan.device)
    model = build_model(recipe, settings=settings).to(plan.device).eval()
    iter_dir = read_tracker(work / "mcore")
    saved = set(dist_checkpointing.load_tensors_metadata(str(iter_dir)))
    wanted = {e.key for e in nested_values(model.sharded_state_dict())
              if isinstance(e, ShardedTensor | ShardedTensorFactory)}
    load_model_weights(iter_dir, [model])
    hf = transformers.AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).to(plan.device).eval()
    generator = torch.Generator().manual_seed(plan.seed)
    ids = torch.randint(0, shape.vocab_size, (4, 64), generator=generator).to(plan.device)
    positions = torch.arange(ids.shape[1], device=plan.device).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
        ours = model(ids, positions, None)[..., : shape.vocab_size].float()
    return {
        "layer_spec": settings.layer_spec,
        "keys_missing_from_checkpoint": sorted(wanted - saved),
        "keys_not_in_model": sorted(saved - wanted),
        "max_abs_logit_diff": float((ref - ours).abs().max()),
        "max_abs_logit": float(ref.abs().max()),
        "top1_agreement": float((ref.argmax(-1) == ours.argmax(-1)).float().mean()),
    }


def run_part(part: str, plan: CheckPlan, work: Path) -> dict[str, Any]:
    if part == "versions":
        return part_versions(plan)
    if part == "baseline":
        return part_baseline(plan)
    if part == "convert":
        return part_convert(plan, work)
    if part == "load":
        return part_load(plan, work)
    raise ValueError(part)


# ---------------------------------------------------------------- the parent


def _child_env(plan: CheckPlan) -> dict[str, str]:
    """This process's environment plus the run settings' exports (where not set), as the
    launchers give them; on CPU one thread per core."""
    from qwen_pretrain.recipes import get_recipe
    from qwen_pretrain.training.run_settings import run_settings

    defaults = run_settings(get_recipe(plan.recipe), plan.device).env
    return {**defaults, **os.environ, "PYTHONWARNINGS": "ignore"}


def _run_logged(cmd: list[str], log: Path, limit_s: int, env: dict[str, str]) -> tuple[int | None, float]:
    """(exit code, or None past the time limit; seconds), stdout and stderr into `log`."""
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            rc: int | None = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=limit_s).returncode
        except subprocess.TimeoutExpired:
            rc = None
    return rc, time.perf_counter() - start


def _window_mean(values: list[float], skip_first: int, skip_last: int) -> float | None:
    window = values[skip_first: len(values) - skip_last]
    return sum(window) / len(window) if window else None


def _gpu_peak(gpu_name: str | None) -> tuple[str | None, float | None]:
    from qwen_pretrain.recipes.hardware import GPUS

    name = (gpu_name or "").lower()
    key = next((k for k in GPUS if k in name), None)
    return key, (GPUS[key].peak_bf16_tflops if key else None)


def _throughput(tokens_per_s: float | None, flops_per_token: float, peak: float | None) -> dict[str, Any]:
    tflops = None if tokens_per_s is None else tokens_per_s * flops_per_token / 1e12
    return {
        "tokens_per_sec_per_gpu": tokens_per_s,
        "tflops_per_gpu": tflops,
        "mfu": None if tflops is None or peak is None else tflops / peak,
    }


def run_check(plan: CheckPlan, out: Path) -> tuple[dict[str, Any], list[str]]:
    """Every part in its own process; (results, failures). Writes OUT/gpu_check.json and .md."""
    from qwen_pretrain.benchmarks.runs import parse_run
    from qwen_pretrain.recipes import get_recipe
    from qwen_pretrain.recipes.planner import flops_per_token

    out.mkdir(parents=True, exist_ok=True)
    recipe = get_recipe(plan.recipe)
    env = _child_env(plan)
    work = Path(tempfile.mkdtemp(prefix=".gpu_check_", dir=out))
    plan_path = work / "plan.json"
    plan_path.write_text(plan.to_json())
    results: dict[str, Any] = {"date": datetime.date.today().isoformat(), "plan": dataclasses.asdict(plan)}
    failures: list[str] = []

    def child(part: str, cmd: list[str]) -> bool:
        rc, seconds = _run_logged(cmd, out / f"{part}.log", plan.time_limits_s[part], env)
        results.setdefault("seconds", {})[part] = round(seconds, 1)
        if rc != 0:
            why = f"past its {plan.time_limits_s[part]} s limit" if rc is None else f"exit {rc}"
            failures.append(f"{part}: {why} (see {out / f'{part}.log'})")
        return rc == 0

    def part(name: str) -> None:
        part_json = work / f"{name}.json"
        if child(name, part_command(name, plan_path, part_json)):
            results[name] = json.loads(part_json.read_text())

    try:
        part("versions")
        if child("ours", train_command(plan, out / "ours")):  # ours first, on a cold GPU
            run = parse_run(out / "ours.log", skip_first=plan.skip_first, skip_last=plan.skip_last)
            results["ours"] = {"parsed": run.to_json()}
            if not run.usable:
                failures.append(f"ours: the log is unusable: {run.reason}")
        part("baseline")
        part("convert")
        if (work / "mcore").is_dir():  # the converter renames it into place when it is complete
            part("load")
        else:
            failures.append("load: skipped, the conversion did not finish")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    _summarize(plan, recipe, results, failures, flops_per_token(recipe.model, plan.seq_length))
    atomic_write_text(out / "gpu_check.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "gpu_check.md", markdown(results, failures))
    return results, failures


def _summarize(plan: CheckPlan, recipe: Any, results: dict[str, Any], failures: list[str], fpt: float) -> None:
    """Throughput of both sides over the same window, their ratio, and the load checks."""
    gpu_key, peak = _gpu_peak((results.get("versions") or {}).get("gpu"))
    results["gpu"] = gpu_key
    tokens_per_step = plan.global_batch_size * plan.seq_length
    ours = (results.get("ours") or {}).get("parsed") or {}
    results["ours_throughput"] = _throughput(ours.get("tokens_per_sec_per_gpu_mean"), fpt, peak)
    base = results.get("baseline")
    base_tps = None
    if base:
        base_tps = _window_mean([tokens_per_step / t for t in base["step_times_s"]], plan.skip_first, plan.skip_last)
    results["baseline_throughput"] = _throughput(base_tps, fpt, peak)
    ours_tps = results["ours_throughput"]["tokens_per_sec_per_gpu"]
    results["ratio_ours_to_baseline"] = ours_tps / base_tps if ours_tps and base_tps else None
    load = results.get("load")
    if load:
        if load["keys_missing_from_checkpoint"] or load["keys_not_in_model"]:
            failures.append(f"load: checkpoint and {load['layer_spec']}-spec model keys differ: "
                            f"missing {load['keys_missing_from_checkpoint'][:3]}, extra {load['keys_not_in_model'][:3]}")
        if not load["max_abs_logit_diff"] <= plan.logits_tolerance:
            failures.append(f"load: max |logit diff| {load['max_abs_logit_diff']:.3e} above {plan.logits_tolerance:g}")


def markdown(results: dict[str, Any], failures: list[str]) -> str:
    def f(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    v = results.get("versions") or {}
    ours, base = results.get("ours_throughput") or {}, results.get("baseline_throughput") or {}
    load = results.get("load") or {}
    plan = results["plan"]
    lines = [
        f"# GPU check, {results['date']}",
        "",
        f"GPU {v.get('gpu') or '-'} (driver {v.get('driver') or '-'}, CUDA {v.get('cuda') or '-'}); torch "
        f"{v.get('torch') or '-'}, Transformer Engine {v.get('transformer_engine') or '-'}, megatron-core "
        f"{v.get('megatron_core') or '-'}, transformers {v.get('transformers') or '-'}",
        "",
        f"{plan['recipe']}, seq {plan['seq_length']}, global batch {plan['global_batch_size']} (micro "
        f"{plan['micro_batch_size']}), {plan['steps']} steps, mean over steps {plan['skip_first']}.."
        f"{plan['steps'] - plan['skip_last'] - 1}:",
        "",
        "| | tokens/s/GPU | TFLOP/s/GPU | MFU |",
        "|---|---|---|---|",
        f"| ours (megatron-core, {plan['device']} run settings) | {f(ours.get('tokens_per_sec_per_gpu'), ',.0f')} | "
        f"{f(ours.get('tflops_per_gpu'), '.1f')} | {f(ours.get('mfu'), '.1%')} |",
        f"| transformers{' + torch.compile' if plan['compile_baseline'] else ''} | "
        f"{f(base.get('tokens_per_sec_per_gpu'), ',.0f')} | "
        f"{f(base.get('tflops_per_gpu'), '.1f')} | {f(base.get('mfu'), '.1%')} |",
        "",
        f"ours / baseline: {f(results.get('ratio_ours_to_baseline'), '.2f')}x",
        "",
        f"conversion: {load.get('layer_spec', '-')}-spec model, keys missing "
        f"{len(load.get('keys_missing_from_checkpoint', [])) if load else '-'}, max |logit diff| "
        f"{f(load.get('max_abs_logit_diff'), '.2e')} (logits up to {f(load.get('max_abs_logit'), '.2f')}), top-1 "
        f"agreement {f(load.get('top1_agreement'), '.2%')}",
        "",
        "status: " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)),
        "",
    ]
    return "\n".join(lines)


def cmd_gpu_check(args: Any) -> int:
    """`bench gpu-check`: the plan (`--dry-run`), or the check on this machine's GPU."""
    plan = CheckPlan(transformer_engine=not args.no_te, steps=args.steps)
    if args.steps <= plan.skip_first + plan.skip_last:
        raise UserError(f"--steps {args.steps}: give more than {plan.skip_first + plan.skip_last} "
                        f"(the first {plan.skip_first} and the last {plan.skip_last} are not averaged)")
    out = Path(args.out)
    if args.dry_run:
        print(describe_plan(plan, out))
        return 0
    from qwen_pretrain.training.run_settings import cuda_visible

    if not cuda_visible():
        raise UserError("gpu-check: CUDA is not visible on this machine: run it on a GPU node "
                        "(e.g. in nvcr.io/nvidia/nemo:25.09), or pass --dry-run to see the plan")
    print(describe_plan(plan, out), flush=True)
    _, failures = run_check(plan, out)
    print((out / "gpu_check.md").read_text())
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    """One part in this process: `PART PLAN_JSON OUT_JSON`."""
    part, plan_path, out_path = argv
    plan = CheckPlan.from_json(Path(plan_path).read_text())
    result = run_part(part, plan, Path(plan_path).parent)
    atomic_write_text(out_path, json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
