"""Generation from a Hugging Face model directory: seeded sampling, sanity metrics, speed.

    from qwen_pretrain.evaluation.generation import generate_texts, bench_generate
    report = generate_texts("hf/", ["Once upon a time"], max_new_tokens=32, temperature=0.8, top_p=0.95, seed=0)
    speed = bench_generate("hf/", batch=1, prompt_len=64, new_tokens=64)

Sampling: logits / temperature, then nucleus (top-p) filtering: keep the most likely tokens
whose cumulative probability reaches p (the first token always stays), renormalise, draw with
a `torch.Generator` seeded per prompt (seed + prompt index), so a prompt's output does not
depend on the other prompts. Temperature 0 is greedy. Only ids of the tokenizer are drawn (the
embedding's padding rows beyond it are never sampled). A prompt stops at the end-of-document
token (`<|endoftext|>`: 151643 for Qwen's tokenizer, the trained tokenizer's own id otherwise)
or after max_new_tokens.

Sanity metrics over the generated tokens (EOS excluded):
- distinct-1 / distinct-2 (Li et al. 2016): distinct unigrams / bigrams divided by the total
  count, pooled over all outputs; near 0 means the model repeats itself, near 1 varied text.
- repetition rate: seq-rep-4 (Welleck et al. 2019), per output 1 - distinct 4-grams / 4-grams,
  averaged over the outputs that have a 4-gram; near 1 means loops.
- EOS share: the share of outputs that ended with the end-of-document token.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qwen_pretrain.recipes.errors import UserError

# ---------------------------------------------------------------- sampling


def sample_next(logits: Any, temperature: float, top_p: float, generator: Any) -> Any:
    """Next token ids [B] from logits [B, V] (temperature, then top-p; greedy at temperature 0)."""
    import torch

    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked higher
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode_loop(
    model: Any, prompt: Any, *, max_new_tokens: int, temperature: float, top_p: float, generator: Any,
    vocab_limit: int, eos_id: int | None, timings: dict[str, float] | None = None,
) -> Any:
    """New token ids [B, <= max_new_tokens] after prompt [B, P], with the model's KV cache.

    Rows that produced `eos_id` are padded with it while others go on; with `eos_id` None the
    loop always runs max_new_tokens steps (benchmarks). `timings` gets ttft_s and decode_s.
    """
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    out_tokens = []
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        for step in range(max_new_tokens):
            logits = out.logits[:, -1, :vocab_limit]
            token = sample_next(logits, temperature, top_p, generator)
            if eos_id is not None:
                token = torch.where(done, torch.full_like(token, eos_id), token)
                done |= token == eos_id
            out_tokens.append(token)
            if step == 0:
                sync()
                t1 = time.perf_counter()
            if (eos_id is not None and bool(done.all())) or step == max_new_tokens - 1:
                break
            out = model(input_ids=token[:, None], past_key_values=out.past_key_values, use_cache=True)
        sync()
        t2 = time.perf_counter()
    if timings is not None:
        timings["ttft_s"] = t1 - t0
        timings["decode_s"] = t2 - t1
        timings["decode_steps"] = len(out_tokens) - 1
    return torch.stack(out_tokens, dim=1)


# ---------------------------------------------------------------- metrics


def _ngrams(ids: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i: i + n]) for i in range(len(ids) - n + 1)]


def distinct_n(outputs: list[list[int]], n: int) -> float:
    grams = [g for ids in outputs for g in _ngrams(ids, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(outputs: list[list[int]], n: int = 4) -> float:
    rates = [1 - len(set(g)) / len(g) for g in (_ngrams(ids, n) for ids in outputs) if g]
    return sum(rates) / len(rates) if rates else 0.0


@dataclass(frozen=True)
class Generation:
    prompt: str
    completion: str
    new_tokens: int
    stopped_at_eos: bool
    token_ids: list[int]


@dataclass(frozen=True)
class GenerationReport:
    model: str
    tokenizer: str
    eos_id: int
    seed: int
    temperature: float
    top_p: float
    max_new_tokens: int
    distinct_1: float
    distinct_2: float
    repetition_rate: float
    eos_share: float
    generations: list[Generation] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per non-empty line) or a jsonl ("prompt" or "text" field)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file; give a text file with one prompt per line or a jsonl")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except ValueError:
                raise UserError(f"{path}:{n}: invalid JSON; one object per line with a \"prompt\" field") from None
            text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path}:{n}: no string \"prompt\" (or \"text\") field")
            prompts.append(text)
        else:
            prompts.append(line)
    if not prompts:
        raise UserError(f"--prompts {path}: no prompt in the file")
    return prompts


def load_model_and_tokenizer(model_dir: str | Path, tokenizer: str | Path | None, dtype: str = "float32") -> tuple[Any, Any, int]:
    """(HF model, our tokenizer, vocab rows to sample from), with the vocabulary check of `eval ppl`."""
    from qwen_pretrain.evaluation.perplexity import check_vocab_match, default_tokenizer, load_hf_model
    from qwen_pretrain.preprocessing.tokenizer import load_tokenizer

    tokenizer = str(tokenizer) if tokenizer else default_tokenizer(model_dir)
    model = load_hf_model(model_dir, dtype)
    check_vocab_match(f"--hf {model_dir}", int(model.config.vocab_size), tokenizer)
    tok = load_tokenizer(tokenizer)
    return model, tok, min(tok.vocab_size, int(model.config.vocab_size))


def generate_texts(
    model_dir: str | Path, prompts: list[str], *, tokenizer: str | Path | None = None, max_new_tokens: int = 64,
    temperature: float = 0.8, top_p: float = 0.95, seed: int = 0, loaded: tuple[Any, Any, int] | None = None,
) -> GenerationReport:
    """One completion per prompt, seeded per prompt; the sanity metrics over all of them."""
    import torch

    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise UserError("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    model, tok, vocab_limit = loaded or load_model_and_tokenizer(model_dir, tokenizer)
    device = next(model.parameters()).device
    gens = []
    for i, prompt in enumerate(prompts):
        ids = tok.encode(prompt) or [tok.eod_id]  # an empty prompt starts a new document
        generator = torch.Generator(device=device).manual_seed(seed + i)
        new = decode_loop(
            model, torch.tensor([ids], device=device), max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, generator=generator, vocab_limit=vocab_limit, eos_id=tok.eod_id,
        )[0].tolist()
        stopped = tok.eod_id in new
        if stopped:
            new = new[: new.index(tok.eod_id)]
        gens.append(Generation(prompt, tok.decode(new), len(new), stopped, new))
    outputs = [g.token_ids for g in gens]
    return GenerationReport(
        model=str(model_dir), tokenizer=str(tok.path.parent), eos_id=tok.eod_id, seed=seed, temperature=temperature,
        top_p=top_p, max_new_tokens=max_new_tokens, distinct_1=distinct_n(outputs, 1), distinct_2=distinct_n(outputs, 2),
        repetition_rate=repetition_rate(outputs), eos_share=sum(g.stopped_at_eos for g in gens) / len(gens),
        generations=gens,
    )


# ---------------------------------------------------------------- speed


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM of /proc/self/status), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True)
class GenerationSpeed:
    model: str
    device: str
    dtype: str
    batch: int
    prompt_len: int
    new_tokens: int
    repeats: int
    ttft_ms: float  # median over repeats: prompt forward + first sampled token
    decode_tokens_per_s: float  # median: tokens after the first, over all rows, per second
    end_to_end_tokens_per_s: float
    peak_memory_bytes: int  # CUDA max allocated on GPU, peak RSS (VmHWM) on CPU
    memory_kind: str
    model_rss_bytes: int  # CPU: RSS after loading the model, before generating
    baseline_tokens_per_s: float | None = None  # transformers' generate() in the same run
    threads: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_generate(
    model_dir: str | Path, *, batch: int = 1, prompt_len: int = 64, new_tokens: int = 64, repeats: int = 3,
    warmup: int = 1, seed: int = 0, dtype: str = "float32", baseline: bool = False,
) -> GenerationSpeed:
    """Greedy decoding of random prompts (seeded), EOS ignored so every run makes `new_tokens`."""
    import torch
    from qwen_pretrain.evaluation.perplexity import load_hf_model

    if min(batch, prompt_len, new_tokens, repeats) < 1 or warmup < 0:
        raise UserError("--batch, --prompt-len, --new-tokens and --repeats must be >= 1")
    on_gpu = torch.cuda.is_available()
    model = load_hf_model(model_dir, dtype)
    if on_gpu:
        model = model.cuda()
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    model_rss = current_rss_bytes()
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed)).to(device)
    runs = []
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + repeats):
        timings: dict[str, float] = {}
        decode_loop(model, prompt, max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, generator=None,
                    vocab_limit=vocab, eos_id=None, timings=timings)
        if i >= warmup:
            runs.append(timings)
    ttft = statistics.median(r["ttft_s"] for r in runs)
    decode = statistics.median(r["decode_s"] for r in runs)
    steps = runs[0]["decode_steps"]
    peak = torch.cuda.max_memory_allocated() if on_gpu else peak_rss_bytes()
    base = None
    if baseline:
        # What a user would run otherwise: transformers' own greedy generate, same prompt and length.
        times = []
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            if on_gpu:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        base = batch * new_tokens / statistics.median(times)
    return GenerationSpeed(
        model=str(model_dir), device=torch.cuda.get_device_name() if on_gpu else "cpu", dtype=dtype, batch=batch,
        prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, ttft_ms=ttft * 1e3,
        decode_tokens_per_s=batch * steps / decode if steps and decode > 0 else 0.0,
        end_to_end_tokens_per_s=batch * new_tokens / (ttft + decode),
        peak_memory_bytes=int(peak), memory_kind="cuda_max_allocated" if on_gpu else "peak_rss",
        model_rss_bytes=model_rss, baseline_tokens_per_s=base, threads=torch.get_num_threads(),
    )


def speed_table(s: GenerationSpeed) -> str:
    rows = [
        ("model", s.model), ("device", f"{s.device} ({s.threads} threads)" if s.device == "cpu" else s.device),
        ("batch x prompt -> new", f"{s.batch} x {s.prompt_len} -> {s.new_tokens} ({s.dtype}, median of {s.repeats})"),
        ("time to first token", f"{s.ttft_ms:,.1f} ms"),
        ("decode", f"{s.decode_tokens_per_s:,.1f} tokens/s"),
        ("end to end", f"{s.end_to_end_tokens_per_s:,.1f} tokens/s"),
        ("peak memory", f"{s.peak_memory_bytes / 2**20:,.0f} MiB ({s.memory_kind})"
         + (f", model loaded {s.model_rss_bytes / 2**20:,.0f} MiB RSS" if s.memory_kind == "peak_rss" else "")),
    ]
    if s.baseline_tokens_per_s:
        rows.append(("transformers generate()", f"{s.baseline_tokens_per_s:,.1f} tokens/s end to end "
                     f"(ours / theirs = {s.end_to_end_tokens_per_s / s.baseline_tokens_per_s:.2f})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomic: a temp file in the same directory, then rename."""
    from qwen_pretrain.recipes.files import atomic_write_bytes

    atomic_write_bytes(Path(path), (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode())
