"""Decode speed and memory on the CPU at batch 1: the TTT model converted from SmolLM2 against SmolLM2.

    python -m benchmarks.ttt_smollm2_cpu --out benchmarks/results/ttt_smollm2_cpu.json [--threads 2]

After 2k, 8k and 32k tokens of context, greedy decode of `--steps` tokens, timed per token (median
and spread over the steps). SmolLM2 reads a KV cache of that length (filled with random keys and
values: a decode step costs the same whatever they hold, and no 32k-token prefill is needed on a
CPU); the TTT model reads its state, the same size at every context, after a prefill of 64 tokens
(its step does not depend on how many tokens came before: it is timed once). The speed of a step depends on the
architecture only, not on the distilled weights, so the converted model stands for TTT-SmolLM2.
The hybrid (`attention_window` 64 and `attention_sinks` 4: attention over the first 4 and the last
64 tokens beside each TTT branch) is timed the same way, after a prefill of 128 tokens, its window
full. All in float32, as `load_pretrained` and `ttt_smollm2` give them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from benchmarks.kernel_bench.timing import git_commit
from ttt_helpers.compat import cache_kwargs, output_cache
from ttt_helpers.model.convert import from_llama
from ttt_helpers.pretrained import load_pretrained

CONTEXTS = (2048, 8192, 32768)
HYBRID = {"attention_window": 64, "attention_sinks": 4}


def step_times(model, token: torch.Tensor, cache, steps: int) -> list[float]:
    """Seconds of each of `steps` greedy single-token forwards over `cache` (updated in place)."""
    times = []
    with torch.no_grad():
        for _ in range(steps):
            start = time.perf_counter()
            out = model(token, use_cache=True, **cache_kwargs(cache))
            token = out.logits[:, -1:].argmax(-1)
            cache = output_cache(out)
            times.append(time.perf_counter() - start)
    return times


def recurrent_decode(model, prompt: torch.Tensor, steps: int) -> dict:
    """A TTT model's decode steps after reading prompt [1, T]: `summary` of their times, the bytes its
    cache holds (the same at any context) and the prompt's length."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
    cache = output_cache(out)
    state_bytes = cache.nbytes()
    times = step_times(model, out.logits[:, -1:].argmax(-1), cache, steps)
    return {**summary(times), "state_bytes": state_bytes, "context": prompt.shape[1]}


def filled_kv_cache(llama, context: int, generator: torch.Generator) -> DynamicCache:
    """A DynamicCache holding `context` tokens of random keys and values in every layer."""
    config = llama.config
    cache = DynamicCache(config=config)
    shape = (1, config.num_key_value_heads, context, config.head_dim)
    for layer in range(config.num_hidden_layers):
        cache.update(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator), layer)
    return cache


def summary(times: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in times)
    return {
        "median_ms": statistics.median(ms),
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "tokens_per_s": 1e3 / statistics.median(ms),
    }


def cpu_model() -> str:
    """The processor's model name (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    llama, _ = load_pretrained()
    ttt = from_llama(llama)
    results = {
        "environment": {
            "torch": torch.__version__,
            "threads": args.threads,
            "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg()[0],  # other work on the machine slows every step
            "commit": git_commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "steps": args.steps,
        "contexts": {},
    }
    prompt = torch.randint(3, llama.config.vocab_size, (1, 64), generator=generator)
    results["ttt"] = recurrent_decode(ttt, prompt, args.steps)
    longer = torch.randint(3, llama.config.vocab_size, (1, 128), generator=generator)
    results["hybrid"] = {**recurrent_decode(from_llama(llama, **HYBRID), longer, args.steps), **HYBRID}
    for name in ("ttt", "hybrid"):
        print(name, round(results[name]["tokens_per_s"], 1), flush=True)
    for context in CONTEXTS:
        kv = filled_kv_cache(llama, context, generator)
        kv_bytes = sum(t.numel() * t.element_size() for layer in kv.layers for t in (layer.keys, layer.values))
        llama_times = step_times(llama, prompt[:, -1:], kv, args.steps)
        results["contexts"][str(context)] = {"smollm2": {**summary(llama_times), "kv_cache_bytes": kv_bytes}}
        del kv
        print(context, round(results["contexts"][str(context)]["smollm2"]["tokens_per_s"], 1), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
