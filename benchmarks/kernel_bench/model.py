"""Whole 125M models, bf16: the TTT-Linear (and TTT-MLP) preset through its kernels against a
same-size Llama as a user who wants speed runs it (compiled, CUDA graphs, a static cache),
prefill and decode, with the decode's memory floor and where a decode step's time goes."""

from __future__ import annotations

import copy
import gc
import time
from collections import Counter

import torch

from .counts import decode_bytes, kv_cache_bytes, model_decode_bytes
from .inputs import Scale
from .timing import Runner, sdpa_backend

PREFILL_NOTE = (
    "forward with use_cache=False and the logits of the last token only. *_eager: the model as "
    "built; *_compiled: torch.compile(dynamic=False) of the Llama, of each block of the TTT model (its "
    "kernels' launches left eager), compiled before timing; *_graph: the "
    "forward replayed from a CUDA graph captured for the shape (the TTT models through "
    "inference.cuda_graphs.CUDAGraphPrefill, the compiled Llama through the same capture). ttt_kernel runs "
    "ttt_impl='kernel'; ttt_reference the same weights on the PyTorch ops."
)
DECODE_NOTE = (
    "greedy decode after a prompt of `context` tokens read with the cache. llama_eager: a Python loop "
    "of single-token forwards over the dynamic cache; llama_graph: a static KV cache and the step compiled "
    "(torch.compile, mode 'reduce-overhead': replayed from CUDA graphs) in the same loop and with the same "
    "argmax as the TTT decoders (LlamaGraphDecoder, 16 untimed steps first); llama_gqa_graph: the same for "
    "the Llama with a third of its heads' keys and values (grouped-query attention, as SmolLM2); ttt_kernel: a Python loop with "
    "ttt_impl='kernel' (ttt_kernel_padded: after the padded prompt of ttt_kernel_graph_padded); ttt_kernel_graph: CUDAGraphDecoder, every step replayed from one CUDA graph "
    "(captured at the first of 16 untimed steps), each block's products that read one input run as one "
    "(FusedProjections); ttt_kernel_graph_padded: the same after a prompt "
    "left-padded by i % mini_batch_size tokens in row i, so that the rows sit at every position of their "
    "mini-batches (each row's position read on the device); ttt_compiled_graph: the same with the blocks compiled; "
    "ttt_compiled_graph_unfused: that without FusedProjections (the model's products as they are); "
    "ttt_reference: the PyTorch ops. The profiles are of fused steps, as the decoder runs them."
)
LLAMA_SHAPE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def build_models(scale: Scale, layer_type: str = "linear", llama: bool = True, kv_groups: int = 1) -> tuple:
    """The TTT preset (random weights) and a Llama of its shape (SDPA, tied embeddings, `kv_groups`
    query heads per key/value head), bf16, eval."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ttt_helpers.model import TTTConfig, TTTForCausalLM

    dtype = torch.bfloat16 if scale.device == "cuda" else torch.float32
    ttt = TTTForCausalLM(TTTConfig(**scale.model, ttt_layer_type=layer_type)).to(scale.device, dtype).eval()
    if not llama:
        return ttt, None
    shape = {k: scale.model[k] for k in LLAMA_SHAPE}
    config = LlamaConfig(
        **shape,
        num_key_value_heads=shape["num_attention_heads"] // kv_groups,
        vocab_size=ttt.config.vocab_size,
        max_position_embeddings=65536,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return ttt, LlamaForCausalLM(config).to(scale.device, dtype).eval()


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters, each tied tensor once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _graphed(fn):
    """fn captured in a CUDA graph after one untimed run: returns the replay."""
    from ttt_helpers.kernels.cuda_graph import capture_step

    graph, _ = capture_step(fn, [])
    return graph.replay


def compiled_blocks(ttt):
    """A copy of the TTT model whose blocks run under torch.compile (dynamic=False): everything
    around the TTT kernels fused by Inductor, the kernels' launches left eager (torch.compiler.disable),
    and the model's own input checks outside the compiled code."""
    compiled = copy.deepcopy(ttt)
    for block in compiled.model.layers:
        block.compile(dynamic=False)
    return compiled


def prefill_variants(run: Runner, models: dict, ids: torch.Tensor, with_reference: bool) -> dict:
    """name -> a function that runs one prefill of `ids` (*_graph: a function that captures it and
    returns the replay). models: "ttt", "llama", and on a GPU "llama_compiled", "ttt_compiled"."""
    from ttt_helpers.inference.cuda_graphs import CUDAGraphPrefill

    def forward(model):
        return lambda: model(ids, use_cache=False, logits_to_keep=1).logits

    def graphed_ttt(model):
        def capture():
            prefill = CUDAGraphPrefill(model)
            prefill(ids, use_cache=False)  # captures
            return lambda: prefill(ids, use_cache=False)

        return capture

    variants = {}
    if models["llama"] is not None:
        variants["llama_eager"] = forward(models["llama"])
        if run.cuda:
            variants["llama_compiled"] = forward(models["llama_compiled"])
            variants["llama_compiled_graph"] = lambda: _graphed(forward(models["llama_compiled"]))
    variants["ttt_kernel"] = forward(models["ttt"])
    if run.cuda:
        variants["ttt_kernel_graph"] = graphed_ttt(models["ttt"])
        if models["ttt_compiled"] is not None:
            variants["ttt_compiled"] = forward(models["ttt_compiled"])
            variants["ttt_compiled_graph"] = graphed_ttt(models["ttt_compiled"])
    if with_reference:
        variants["ttt_reference"] = forward(models["ttt"])
    return variants


def time_prefill(run: Runner, row: dict, name: str, fn, tokens: int, models: dict) -> None:
    """row[name_ms] and row[name_tokens_per_s] of fn; a *_graph entry captures its replay first,
    compiled ones run once first (compiling), the time of that first call recorded."""
    for key in ("ttt", "ttt_compiled"):
        if models.get(key) is not None:
            models[key].set_ttt_impl("reference" if name == "ttt_reference" else "kernel")
    if name.endswith("_graph"):
        fn = run.attempt(row, f"{name}_capture", fn)
        row.pop(f"{name}_capture", None)
        if fn is None:
            return
    elif name.endswith("_compiled"):
        if run.attempt(row, f"{name}_first_call_s", lambda: run.wall_s(fn)) is None:
            return
    timer = (lambda f: run.slow_ms(f, repeats=1)) if name == "ttt_reference" else run.fast_ms
    ms = run.attempt(row, f"{name}_ms", lambda: timer(fn))
    if ms is not None:
        row[f"{name}_tokens_per_s"] = tokens / ms * 1e3
    if name.startswith("llama") and not name.endswith("_graph"):  # a graph's replay hides its kernels' names
        run.attempt(row, f"{name}_sdpa_backend", lambda: sdpa_backend(fn, run.device))


class LlamaGraphDecoder:
    """A Llama-style model's greedy decode as a user who wants speed runs it: a static KV cache of
    `max_len` tokens and the one-token step compiled (torch.compile, `mode` "reduce-overhead": replayed
    from CUDA graphs; None: eager). Build one per shape and reuse it: `read(prompt)` empties the cache
    and reads a prompt [B, T] `chunk` tokens at a time; `step(token)` decodes one token [B, 1]."""

    def __init__(self, llama, max_len: int, *, mode: str | None = "reduce-overhead", chunk: int = 1024) -> None:
        from transformers import StaticCache

        self.llama, self.max_len, self.chunk = llama, max_len, chunk
        self.cache = StaticCache(config=llama.config, max_cache_len=max_len)
        self.position: torch.Tensor | None = None
        self._run = torch.compile(self._step, mode=mode, fullgraph=True, dynamic=False) if mode else self._step

    def _step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        from ttt_helpers.compat import cache_kwargs

        return self.llama(token, cache_position=position, use_cache=True, **cache_kwargs(self.cache)).logits

    @torch.no_grad()
    def read(self, prompt: torch.Tensor) -> torch.Tensor:
        """Empty the cache and read prompt [B, T]: the greedy next token [B, 1]."""
        from ttt_helpers.compat import cache_kwargs

        T = prompt.shape[1]
        if T >= self.max_len:
            raise ValueError(f"prompt of {T} tokens leaves no room in a cache of {self.max_len}")
        self.cache.reset()
        for s in range(0, T, self.chunk):
            positions = torch.arange(s, min(T, s + self.chunk), device=prompt.device)
            ids = prompt[:, s : s + self.chunk]
            out = self.llama(
                ids, cache_position=positions, use_cache=True, logits_to_keep=1, **cache_kwargs(self.cache)
            )
        self.position = torch.tensor([T], device=prompt.device)
        return out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Decode token [B, 1] at the next position: its logits [B, 1, V]."""
        logits = self._run(token, self.position)
        self.position = self.position + 1
        return logits


def graph_decode_rate(decoder: LlamaGraphDecoder, prompt: torch.Tensor, steps: int, warmup: int = 16) -> dict:
    """Greedy decode after `prompt` [B, T] through `decoder`, in a plain loop with the argmax, as
    `CUDAGraphDecoder` is timed: tokens/s over `steps` steps after `warmup` untimed ones (which compile
    and capture on a first call), the peak memory, the attention implementation and the greedy tokens
    [B, warmup + steps + 1] (the first from the prompt)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    cuda = prompt.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tokens = [decoder.read(prompt)]
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        tokens.append(decoder.step(tokens[-1])[:, -1:].argmax(-1))
    if cuda:
        torch.cuda.synchronize()
    return {
        "tokens_per_s": prompt.shape[0] * steps / (time.perf_counter() - t0),
        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "attention": decoder.llama.config._attn_implementation,
        "tokens": torch.cat(tokens, 1),
    }


def llama_graph_decode(
    llama,
    prompt: torch.Tensor,
    steps: int,
    *,
    warmup: int = 16,
    chunk: int = 1024,
    mode: str | None = "reduce-overhead",
) -> dict:
    """`graph_decode_rate` through a `LlamaGraphDecoder` built for this prompt's length."""
    decoder = LlamaGraphDecoder(llama, prompt.shape[1] + warmup + steps + 1, mode=mode, chunk=chunk)
    return graph_decode_rate(decoder, prompt, steps, warmup)


def _read_prompt(model, prompt: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple:
    """Prefill `prompt` (left-padded where attention_mask says) with a cache: (the cache, the
    greedy next token [B, 1])."""
    from ttt_helpers.compat import output_cache

    out = model(prompt, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
    return output_cache(out), out.logits[:, -1:].argmax(-1)


def staggered_padding(prompt: torch.Tensor, mini_batch_size: int) -> torch.Tensor:
    """An attention mask that pads row i of `prompt` [B, T] on the left by i % mini_batch_size
    tokens, so that the rows decode at every position of their mini-batches at once."""
    B, T = prompt.shape
    if T < mini_batch_size:
        raise ValueError(f"prompt must hold at least {mini_batch_size} tokens per row, got {T}")
    pad = torch.arange(B, device=prompt.device)[:, None] % mini_batch_size
    return (torch.arange(T, device=prompt.device)[None, :] >= pad).long()


def _greedy_step(model, token: torch.Tensor, cache) -> tuple:
    """One single-token forward over the cache (either model's): (the cache, the next token)."""
    from ttt_helpers.compat import cache_kwargs, output_cache

    out = model(token, use_cache=True, **cache_kwargs(cache))
    return output_cache(out), out.logits[:, -1:].argmax(-1)


def decode_tokens_per_s(
    run: Runner,
    model,
    prompt: torch.Tensor,
    steps: int,
    graph: bool = False,
    padded: bool = False,
    fuse: bool = True,
) -> float:
    """Greedy decode of `steps` tokens per sequence after reading `prompt`; tokens/s of the decode.
    A Python loop of single-token forwards (the Llama's over its dynamic cache); graph: a TTT model
    through CUDAGraphDecoder (with `fuse`), after 16 untimed steps (the first captures its graph);
    padded: the prompt left-padded by `staggered_padding` (each row at its own mini-batch position)."""
    from ttt_helpers.inference.cuda_graphs import CUDAGraphDecoder

    mask = staggered_padding(prompt, model.config.mini_batch_size) if padded else None
    cache, token = _read_prompt(model, prompt, mask)
    if graph:
        decoder = CUDAGraphDecoder(model, cache, fuse=fuse)
        for _ in range(16):
            token = decoder.step(token)[:, -1:].argmax(-1)
    gc.collect()
    run.sync()
    start = time.perf_counter()
    for _ in range(steps):
        if graph:
            token = decoder.step(token)[:, -1:].argmax(-1)
        else:
            cache, token = _greedy_step(model, token, cache)
    run.sync()
    return prompt.shape[0] * steps / (time.perf_counter() - start)


def decode_floor(ttt, llama, B: int, context: int, steps: int, copy_gbps: float) -> dict:
    """The fewest bytes one decode step moves, and the time they take at the measured copy bandwidth:
    the TTT model's weights plus its layers' states (read, and the gradient sums written); the
    Llama's weights plus its KV cache at the middle of the timed steps (read)."""
    cfg = ttt.config
    H, C = cfg.num_attention_heads, cfg.hidden_size
    ttt_layer = decode_bytes(B, H, C // H, cfg.mini_batch_size, 2, 4)  # state_elt: the float32 state
    weights = param_bytes(ttt)
    out = {"ttt_bytes": model_decode_bytes(weights, ttt_layer, cfg.num_hidden_layers)}
    if llama is not None:
        kv = kv_cache_bytes(B, context + steps // 2, C, 2)
        out["llama_bytes"] = model_decode_bytes(param_bytes(llama), kv, llama.config.num_hidden_layers)
    for key in list(out):
        out[key.replace("bytes", "floor_ms")] = out[key] / (copy_gbps * 1e9) * 1e3
    out["weights_bytes_ttt"] = weights
    return out


def profile_decode(run: Runner, model, prompt: torch.Tensor, steps: int = 16) -> dict:
    """Where one eager decode step's device time goes: kernels launched per step, the sum of their
    device times, the largest kernels by total time (the CUDA-graph step runs the same kernels:
    the products fused, as here), and the operators that launch the most device time, with their
    input shapes."""
    from torch.profiler import ProfilerActivity, profile

    from ttt_helpers.inference.fused_projections import FusedProjections

    cache, token = _read_prompt(model, prompt)
    cache.keep_positions(model.config.mini_batch_size)  # positions read on the device, as CUDAGraphDecoder runs
    with FusedProjections(model).applied():
        for _ in range(steps):  # every position once before profiling (a compiled model compiles here)
            cache, token = _greedy_step(model, token, cache)
        run.sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for _ in range(steps):
                cache, token = _greedy_step(model, token, cache)
            run.sync()
    # a compiled graph's call is also recorded on the device's timeline, as "## Call CompiledFxGraph ... ##",
    # spanning the kernels it launches: a range, not a kernel, so left out of the kernels and their sum
    on_device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [e for e in on_device if not e.name.startswith("## ")]
    ranges = len(on_device) - len(kernels)
    total: Counter = Counter()
    for e in kernels:
        total[e.name[:80]] += e.device_time
    device_us = sum(total.values())
    ops = [
        e
        for e in prof.key_averages(group_by_input_shape=True)
        if e.self_device_time_total > 0 and not e.key.startswith("## ")
    ]
    ops.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return {
        "steps": steps,
        "compiled_graph_calls_per_step": ranges / steps,
        "kernels_per_step": len(kernels) / steps,
        "kernel_us_per_step": device_us / steps,
        "top_kernels": [
            {"name": name, "us_per_step": us / steps, "share": us / device_us} for name, us in total.most_common(8)
        ],
        "top_ops": [
            {
                "op": e.key[:80],
                "input_shapes": str(e.input_shapes)[:160],
                "calls_per_step": e.count / steps,
                "us_per_step": e.self_device_time_total / steps,
                "share": e.self_device_time_total / device_us,
            }
            for e in ops[:12]
        ],
    }


def _models(run: Runner, scale: Scale) -> dict:
    """The TTT-Linear preset and the Llama, and on a GPU their compiled forms."""
    ttt, llama = build_models(scale)
    models = {"ttt": ttt, "llama": llama, "llama_compiled": None, "ttt_compiled": None}
    if run.cuda:
        # one compiled graph per block, shape and decode position: 12 x 16 in decode alone, which the
        # default limits (8 per function, 256 in all) would cut short, running the rest uncompiled
        torch._dynamo.config.recompile_limit = 1024
        torch._dynamo.config.accumulated_recompile_limit = 8192
        models |= {"llama_compiled": torch.compile(llama, dynamic=False), "ttt_compiled": compiled_blocks(ttt)}
    return models


def _params_M(models: dict) -> dict:
    return {k: sum(p.numel() for p in models[k].parameters()) / 1e6 for k in ("ttt", "llama")}


def model_prefill(run: Runner, scale: Scale) -> dict:
    """The TTT-Linear preset against the Llama: prefill at every (B, T) of the scale, each model
    eager, compiled, and replayed from CUDA graphs."""
    models = _models(run, scale)
    result = {"note": PREFILL_NOTE, "params_M": _params_M(models), "prefill": []}
    vocab = models["ttt"].config.vocab_size
    with torch.no_grad():
        for B, T in scale.prefill_cases:
            row = {"B": B, "T": T}
            ids = torch.randint(0, vocab, (B, T), device=run.device)
            variants = prefill_variants(run, models, ids, with_reference=B * T <= scale.reference_max_tokens // 16)
            for name, fn in variants.items():
                time_prefill(run, row, name, fn, B * T, models)
            del variants
            gc.collect()
            result["prefill"].append(row)
            print(f"  model prefill {row}", flush=True)
    models["ttt"].set_ttt_impl("auto")
    return result


def decode_variants(
    run: Runner,
    models: dict,
    prompt: torch.Tensor,
    steps: int,
) -> dict:
    """Each way of decoding `steps` tokens after `prompt` [B, context] that the section times, by
    name: a function that returns tokens/s (the CUDA graph and compiled ones on a GPU only, the
    reference where the context is at most 512 tokens: its per-token work does not depend on it).
    models: "ttt", "llama", and on a GPU "ttt_compiled" and "llama_gqa"."""
    ttt, llama, compiled = models["ttt"], models["llama"], models["ttt_compiled"]
    timed = {
        "llama_eager": lambda: decode_tokens_per_s(run, llama, prompt, steps),
        "ttt_kernel": lambda: decode_tokens_per_s(run, ttt, prompt, steps),
        "ttt_kernel_padded": lambda: decode_tokens_per_s(run, ttt, prompt, steps, padded=True),
    }
    if run.cuda:
        for name in ("llama", "llama_gqa"):  # one decoder per model and context, reused by every run
            decoder = LlamaGraphDecoder(models[name], prompt.shape[1] + 16 + steps + 1)
            timed[f"{name}_graph"] = lambda d=decoder: graph_decode_rate(d, prompt, steps)["tokens_per_s"]
        timed["ttt_kernel_graph"] = lambda: decode_tokens_per_s(run, ttt, prompt, steps, graph=True)
        timed["ttt_kernel_graph_padded"] = lambda: decode_tokens_per_s(run, ttt, prompt, steps, graph=True, padded=True)
        timed["ttt_compiled_graph"] = lambda: decode_tokens_per_s(run, compiled, prompt, steps, graph=True)
        timed["ttt_compiled_graph_unfused"] = lambda: decode_tokens_per_s(
            run, compiled, prompt, steps, graph=True, fuse=False
        )
    if prompt.shape[1] <= 512:
        timed["ttt_reference"] = lambda: decode_tokens_per_s(run, ttt, prompt, steps, graph=False)
    return timed


def add_floor_fractions(row: dict, B: int) -> None:
    """row["floor"][<name>_fraction]: the memory floor of a step over the measured step, for the
    decodes from CUDA graphs and the static-cache Llama (with all its key/value heads)."""
    for name, key in (
        ("ttt_kernel_graph", "ttt_floor_ms"),
        ("ttt_kernel_graph_padded", "ttt_floor_ms"),
        ("ttt_compiled_graph", "ttt_floor_ms"),
        ("ttt_compiled_graph_unfused", "ttt_floor_ms"),
        ("llama_graph", "llama_floor_ms"),
    ):
        if isinstance(row.get(f"{name}_tokens_per_s"), float):
            step_ms = B / row[f"{name}_tokens_per_s"] * 1e3
            row["floor"][f"{name}_fraction"] = row["floor"][key] / step_ms


def model_decode(run: Runner, scale: Scale, peaks: dict, progress=lambda result: None) -> dict:
    """Decode at the decoding batch after each context: the Llama eager and from a static cache,
    the TTT model eager, from CUDA graphs, and with its blocks compiled inside the graphs; the
    memory floor of a step, and where an eager step's device time goes, plain and with the blocks
    compiled (with how many graphs the compiler built in the section). progress(result) runs after
    every context, so that a run cut short keeps the contexts it finished."""
    models = _models(run, scale)
    ttt, llama, compiled = models["ttt"], models["llama"], models["ttt_compiled"]
    if run.cuda:
        models["llama_gqa"] = build_models(scale, kv_groups=3)[1]
    result = {"note": DECODE_NOTE, "params_M": _params_M(models), "decode": []}
    vocab = ttt.config.vocab_size
    B, steps = scale.decode_batch, scale.decode_steps
    with torch.no_grad():
        for context in scale.decode_contexts:
            prompt = torch.randint(0, vocab, (B, context), device=run.device)
            row = {"B": B, "context": context, "steps": steps}
            timed = decode_variants(run, models, prompt, steps)
            for name, fn in timed.items():
                for model in (ttt, compiled):
                    if model is not None:
                        model.set_ttt_impl("reference" if name == "ttt_reference" else "kernel")
                run.median_of_3(row, name, fn)
            row["floor"] = decode_floor(ttt, llama, B, context, steps, peaks["copy_gbps"])
            add_floor_fractions(row, B)
            result["decode"].append(row)
            progress(result)
            print(f"  model decode {row}", flush=True)
            del prompt
        ttt.set_ttt_impl("kernel")
        context = scale.decode_contexts[min(1, len(scale.decode_contexts) - 1)]
        prompt = torch.randint(0, vocab, (B, context), device=run.device)
        if run.cuda:
            run.attempt(result, "decode_profile", lambda: {"context": context, **profile_decode(run, ttt, prompt)})
            compiled.set_ttt_impl("kernel")
            run.attempt(
                result, "decode_profile_compiled", lambda: {"context": context, **profile_decode(run, compiled, prompt)}
            )
            result["compiled_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    ttt.set_ttt_impl("auto")
    return result


def mlp_model_level(run: Runner, scale: Scale) -> dict:
    """The preset with TTT-MLP layers: prefill (eager and CUDA graphs) and decode (eager and
    CUDAGraphDecoder) through the kernels, against the same weights on the reference ops."""

    ttt, _ = build_models(scale, layer_type="mlp", llama=False)
    models = {"ttt": ttt, "llama": None, "llama_compiled": None, "ttt_compiled": None}
    result = {
        "note": "as the TTT-Linear model section; the TTT layers are TTT-MLP (hidden width 4 x the head dim)",
        "params_M": sum(p.numel() for p in ttt.parameters()) / 1e6,
        "prefill": [],
        "decode": [],
    }
    vocab = ttt.config.vocab_size
    with torch.no_grad():
        for B, T in scale.prefill_cases:
            if B * T > 16384 * 2 and run.cuda:
                continue  # the TTT-MLP prefill takes about 0.4 s per 16k tokens at batch 1
            row = {"B": B, "T": T}
            ids = torch.randint(0, vocab, (B, T), device=run.device)
            variants = prefill_variants(run, models, ids, with_reference=B * T <= scale.reference_max_tokens // 16)
            for name in ("ttt_kernel", "ttt_kernel_graph", "ttt_reference"):
                if name in variants:
                    time_prefill(run, row, name, variants[name], B * T, models)
            row = {k.replace("ttt_", "ttt_mlp_"): v for k, v in row.items()}
            del variants
            gc.collect()
            result["prefill"].append(row)
            print(f"  mlp model prefill {row}", flush=True)
        B, steps = scale.decode_batch, min(64, scale.decode_steps)
        for context in scale.decode_contexts[:3]:
            prompt = torch.randint(0, vocab, (B, context), device=run.device)
            row = {"B": B, "context": context, "steps": steps}
            timed = {"ttt_mlp_kernel": False}
            if run.cuda:
                timed["ttt_mlp_kernel_graph"] = True
            if context <= 16:
                timed["ttt_mlp_reference"] = False
            for name, graph in timed.items():
                ttt.set_ttt_impl("reference" if name.endswith("reference") else "kernel")
                run.median_of_3(row, name, lambda g=graph: decode_tokens_per_s(run, ttt, prompt, steps, g))
            result["decode"].append(row)
            print(f"  mlp model decode {row}", flush=True)
            del prompt
    ttt.set_ttt_impl("auto")
    return result
