"""TTT-SmolLM2 against SmolLM2 on one GPU: perplexity, long documents, passkey recall, chat, decode.

    python -m benchmarks.ttt_smollm2 --bank BANK --delta DELTA --gguf GGUF --out RESULTS.json
        [--sections perplexity,long,passkey,chat,decode] [--cpu-check]

The models: SmolLM2-135M-Instruct (the teacher, from its GGUF), SmolLM2 with a sliding window of
2,048 tokens (the constant-memory Transformer: the same weights, each attention limited to the last
2,048 tokens), the converted model before distillation, TTT-SmolLM2 (converted plus the delta) and
TTT-SmolLM2 with its inner learning rate at 0 (the state never leaves W0: what test-time learning adds).
For a delta of hybrid layers (`TTTConfig.attention_window`) the converted model is SmolLM2 whose
attention keeps the first tokens and a short window (StreamingLLM), measured on long documents and
passkeys too: what the distilled TTT branch adds to it.
Every section but decode runs in float32 (the TTT kernels' products in tf32), so a CPU can check
its numbers; decode runs in bfloat16, as a user would. The JSON is rewritten after every document,
cell and section, and a run with the same --out skips what it holds (a cut-short run resumes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.kernel_bench.timing import git_commit
from ttt_helpers import pretrained
from ttt_helpers.compat import cache_kwargs
from ttt_helpers.distill.bank import LONG, SHORT, Bank, load_bank
from ttt_helpers.distill.cli import load_teacher
from ttt_helpers.distill.loop import environment
from ttt_helpers.model.convert import conversion, from_llama
from ttt_helpers.pretrained import sliding_window

WINDOW = 2048
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BINS = [0, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768]  # loss by token index: mean NLL in each bin
CURVE = 512  # and the mean NLL of every 512 tokens, for the plot
PASSKEY_LENGTHS = (1024, 4096, 16384, 32768)
PASSKEY_DEPTHS = (0.1, 0.5, 0.9)
PASSKEY_TRIALS = 20
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences what a neural network is.",
    "Give me three tips for sleeping better.",
    "What is 12 plus 7?",
    "Write a Python function that reverses a string.",
)


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save(results: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


@contextmanager
def inner_lr_zero(model):
    """The TTT layers' inner learning rate at 0 inside the block: each layer keeps W0 for the whole sequence."""
    saved = [block.ttt.base_lr for block in model.model.layers]
    for block in model.model.layers:
        block.ttt.base_lr = 0.0
    try:
        yield
    finally:
        for block, lr in zip(model.model.layers, saved):
            block.ttt.base_lr = lr


def is_ttt(model) -> bool:
    return getattr(model.config, "model_type", None) == "ttt"


def prefill(model, ids: torch.Tensor, tokens: int = 4096):
    """The last hidden states [B, T, C] of a Llama (or its sliding-window Mistral) and its cache: the
    sequence goes in chunks of tokens // B positions through a DynamicCache, so no attention matrix of
    T x T is ever built (a 32k prompt in one float32 SDPA call needs 36 GiB per sequence)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    chunk = max(256, tokens // ids.shape[0])
    out = [
        model.model(input_ids=ids[:, s : s + chunk], use_cache=True, **cache_kwargs(cache)).last_hidden_state
        for s in range(0, ids.shape[1], chunk)
    ]
    return torch.cat(out, 1), cache


def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """The last hidden states [B, T, C] of either kind of model."""
    if is_ttt(model):
        return model.model(model.model.embed_tokens(ids), None)
    return prefill(model, ids)[0]


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The negative log-likelihood of each next token of ids [1, T]: [T - 1] float32 (head in chunks)."""
    h = hidden_states(model, ids)[0, :-1]
    target = ids[0, 1:]
    out = []
    for s in range(0, h.shape[0], chunk):
        logits = model.lm_head(h[s : s + chunk]).float()
        out.append(F.cross_entropy(logits, target[s : s + chunk], reduction="none"))
    return torch.cat(out)


def binned(nll: np.ndarray) -> dict:
    """Mean NLL per token-index bin (BINS; a bin is reported once the document covers it) and per CURVE tokens.
    nll[i] is the loss of token i + 1, so token index t has nll[t - 1]."""
    index = np.arange(1, nll.size + 1)
    bins = {}
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        mask = (index >= max(lo, 1)) & (index < hi)
        if index[-1] >= hi - 1:
            bins[f"{lo}-{hi}"] = float(nll[mask].mean())
    curve = [float(nll[s : s + CURVE].mean()) for s in range(0, nll.size - CURVE + 1, CURVE)]
    return {"bins": bins, "curve": curve}


def section_perplexity(models: dict, bank, results: dict, path: Path, max_docs: int | None) -> None:
    """Per held-out document, the summed NLL of its first SHORT tokens' next tokens, per model, and
    the sha256 of those tokens (a CPU that tokenizes the same text can check it has the same ids)."""
    out = results.setdefault("perplexity", {"tokens": SHORT, "documents": {}})
    for domain in ("plays", "code", "pydocs"):
        for name, ids in bank.eval_documents(domain, SHORT)[:max_docs]:
            entry = out["documents"].setdefault(name, {"domain": domain, "ids_sha256": ids_sha256(ids[:SHORT])})
            x = torch.from_numpy(ids[:SHORT].astype(np.int64))[None].to(DEVICE)
            for label, (model, context) in models.items():
                if label in entry:
                    continue
                with context():
                    entry[label] = float(token_nll(model, x).double().sum())
            save(results, path)


def ids_sha256(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<u2").tobytes()).hexdigest()


def section_long(models: dict, bank, results: dict, path: Path, max_docs: int | None, length: int) -> None:
    """Per held-out document of at least LONG tokens, the loss by token index over its first `length` tokens."""
    out = results.setdefault("long", {"tokens": length, "bins": BINS, "curve_tokens": CURVE, "documents": {}})
    for domain in ("plays", "code", "pydocs"):
        for name, ids in bank.eval_documents(domain, LONG)[:max_docs]:
            entry = out["documents"].setdefault(name, {"domain": domain, "ids_sha256": ids_sha256(ids[:length])})
            x = torch.from_numpy(ids[:length].astype(np.int64))[None].to(DEVICE)
            for label, (model, context) in models.items():
                if label in entry:
                    continue
                t0 = time.perf_counter()
                with context():
                    nll = token_nll(model, x).cpu().numpy()
                entry[label] = {**binned(nll), "seconds": round(time.perf_counter() - t0, 2)}
                empty_cache()
            save(results, path)


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> tuple[list[int], int]:
    """Token ids of a passkey prompt of exactly `length` tokens: filler, the needle at `depth` (at a
    sentence start), filler, the question. Returns (ids, where the needle starts)."""
    needle = tokenizer.encode(f"The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False)
    question = tokenizer.encode("What is the pass key? The pass key is", add_special_tokens=False)
    sentence = tokenizer.encode(FILLER, add_special_tokens=False)
    room = length - len(needle) - len(question)
    filler = (sentence * (room // len(sentence) + 1))[:room]
    at = int(round(depth * room / len(sentence))) * len(sentence)
    at = min(at, room)
    return filler[:at] + needle + filler[at:] + question, at


@torch.no_grad()
def greedy_llama(model, batch: torch.Tensor, new_tokens: int, eos: int) -> torch.Tensor:
    """Greedy continuation [B, new_tokens] of a Llama after a chunked prefill; a row that has said eos says
    eos from then on (what generate() returns with pad_token_id = eos)."""
    h, cache = prefill(model, batch)
    said = []
    done = torch.zeros(batch.shape[0], dtype=torch.bool, device=batch.device)
    for i in range(new_tokens):
        token = model.lm_head(h[:, -1]).argmax(-1).masked_fill(done, eos)
        said.append(token)
        done |= token == eos
        if i + 1 < new_tokens:
            h = model.model(input_ids=token[:, None], use_cache=True, **cache_kwargs(cache)).last_hidden_state
    return torch.stack(said, 1)


@torch.no_grad()
def answers(model, batch: torch.Tensor, tokenizer, context) -> list[str]:
    if not is_ttt(model):
        return [tokenizer.decode(row) for row in greedy_llama(model, batch, 8, tokenizer.eos_token_id)]
    with context():
        out = model.generate(
            batch,
            attention_mask=torch.ones_like(batch),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return [tokenizer.decode(row[batch.shape[1] :]) for row in out]


def section_passkey(models: dict, tokenizer, results: dict, path: Path, batch_sizes: dict, lengths: tuple) -> None:
    out = results.setdefault(
        "passkey", {"lengths": lengths, "depths": PASSKEY_DEPTHS, "trials": PASSKEY_TRIALS, "cells": {}}
    )
    rng = np.random.default_rng(0)
    keys = rng.integers(10_000, 100_000, size=PASSKEY_TRIALS).tolist()
    for length in lengths:
        for depth in PASSKEY_DEPTHS:
            cell = out["cells"].setdefault(f"{length}@{depth}", {})
            prompts = [passkey_prompt(tokenizer, length, depth, k)[0] for k in keys]
            ids = torch.tensor(prompts).to(DEVICE)
            for label, (model, context) in models.items():
                if label in cell:
                    continue
                said = []
                step = batch_sizes.get(label, PASSKEY_TRIALS)
                for s in range(0, len(keys), step):
                    said += answers(model, ids[s : s + step], tokenizer, context)
                    empty_cache()
                found = [re.search(r"\d{5}", a) for a in said]
                correct = [bool(m) and int(m.group()) == k for m, k in zip(found, keys)]
                cell[label] = {"correct": sum(correct), "answers": said[:3]}
            save(results, path)


def section_chat(models: dict, tokenizer, results: dict, path: Path) -> None:
    out = results.setdefault("chat", {})
    for prompt in CHAT_PROMPTS:
        entry = out.setdefault(prompt, {})
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, return_tensors="pt").input_ids.to(DEVICE)
        for label, (model, context) in models.items():
            if label not in entry:
                entry[label] = answers_long(model, ids, tokenizer, context)
        save(results, path)


@torch.no_grad()
def answers_long(model, ids, tokenizer, context, new_tokens: int = 64) -> str:
    with context():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def ttt_graph_decode(ttt, prompt: torch.Tensor, steps: int) -> dict:
    """Greedy decode of TTT-SmolLM2 from `CUDAGraphDecoder` after reading `prompt` [B, T]: tokens/s over
    `steps` steps after 16 untimed ones, the state's bytes and the peak memory."""
    from ttt_helpers.compat import output_cache
    from ttt_helpers.inference.cuda_graphs import CUDAGraphDecoder

    torch.cuda.reset_peak_memory_stats()
    o = ttt(prompt, use_cache=True, logits_to_keep=1)
    cache, token = output_cache(o), o.logits[:, -1:].argmax(-1)
    decoder = CUDAGraphDecoder(ttt, cache)
    for _ in range(16):
        token = decoder.step(token)[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        token = decoder.step(token)[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    rate = prompt.shape[0] * steps / (time.perf_counter() - t0)
    return {"tokens_per_s": rate, "state_bytes": cache.nbytes(), "peak_bytes": torch.cuda.max_memory_allocated()}


def section_decode(ttt_cpu, llama_cpu, results: dict, path: Path, minutes: float) -> None:
    """Greedy decode tokens/s after 2k, 8k and 32k tokens of context, bf16, B = 1 and 64, both models
    timed in the same loop with the same argmax after 16 untimed steps: TTT-SmolLM2 through
    CUDAGraphDecoder, SmolLM2 with a static KV cache and its step compiled into CUDA graphs
    (`llama_graph_decode`). Cells measured on another GPU are measured again."""
    from benchmarks.kernel_bench.model import llama_graph_decode

    device = torch.cuda.get_device_name()
    out = results.setdefault("decode", {"steps": 64, "cells": {}})
    if out.get("device") != device:
        out.update(device=device, cells={})
    ttt = ttt_cpu.to("cuda", torch.bfloat16).eval()
    llama = llama_cpu.to("cuda", torch.bfloat16).eval()
    start = time.perf_counter()
    for batch in (1, 64):
        for context in (2048, 8192, 32768):
            cell = out["cells"].setdefault(f"{batch}x{context}", {})
            prompt = torch.randint(
                0, 49152, (batch, context), device="cuda", generator=torch.Generator("cuda").manual_seed(0)
            )
            if "ttt" not in cell:
                cell["ttt"] = ttt_graph_decode(ttt, prompt, out["steps"])
                empty_cache()
                save(results, path)
            if "smollm2" not in cell and time.perf_counter() - start < 60 * minutes:
                config = llama.config
                per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
                kv = per_token * batch * (context + 16 + out["steps"] + 1)
                try:
                    run = llama_graph_decode(llama, prompt, out["steps"])
                    run.pop("tokens")
                    cell["smollm2"] = {**run, "kv_cache_bytes": kv}
                except torch.OutOfMemoryError:
                    cell["smollm2"] = {"out_of_memory": True, "kv_cache_bytes": kv}
                except Exception as error:  # recorded, so the other cells still run
                    cell["smollm2"] = {"error": f"{type(error).__name__}: {error}"[:2000], "kv_cache_bytes": kv}
                empty_cache()
                save(results, path)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bank", required=True)
    parser.add_argument("--delta", required=True)
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sections", default="perplexity,long,passkey,chat,decode")
    parser.add_argument("--decode-minutes", type=float, default=4.0, help="start no SmolLM2 decode cell after this")
    parser.add_argument("--max-docs", type=int, default=None, help="documents per domain (a dry run: a few)")
    parser.add_argument("--long-tokens", type=int, default=LONG, help="tokens of each long document (a dry run: fewer)")
    parser.add_argument("--passkey-lengths", default=",".join(map(str, PASSKEY_LENGTHS)))
    parser.add_argument("--ttt-impl", default="auto", choices=("auto", "reference"), help="the TTT layers' path")
    parser.add_argument(
        "--reuse", default=None, help="another delta's results: take SmolLM2's, its window's and the converted model's"
    )
    return parser.parse_args()


def record_visit(
    results: dict, path: Path, args: argparse.Namespace, info: dict, llama_cpu: torch.nn.Module, bank: Bank
) -> None:
    """results["provenance"]: the delta, teacher and bank the results are of (a file holding another
    delta's results is refused), and this invocation as one more visit: a cut-short run resumed on
    another machine says what ran where."""
    provenance = results.setdefault("provenance", {"delta_sha256": info["sha256"], "visits": []})
    if provenance["delta_sha256"] != info["sha256"]:
        raise ValueError(f"{path} holds results of the delta {provenance['delta_sha256'][:12]}..., not of {args.delta}")
    provenance["teacher_sha256"] = pretrained.weights_sha256(llama_cpu)
    provenance["bank"] = bank.manifest["provenance"]
    provenance["visits"].append(
        {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": git_commit(),
            "environment": environment(),
            "arguments": vars(args),
        }
    )


BASE_MODELS = ("smollm2", "smollm2_window", "converted")  # what a delta does not change


def reuse_base_models(results: dict, other: dict, models: tuple[str, ...] = BASE_MODELS) -> dict:
    """Copy into `results` the entries of `models` (some of BASE_MODELS) from `other`, another delta's results of the same
    teacher, data and settings, so that a run measures only the delta's models: per document where
    the tokens' sha256 agree, per passkey cell where lengths, depths and trials agree, per chat
    prompt, per decode cell where the GPU and steps agree. Call after `record_visit`. Returns how
    many entries it copied, by section, as recorded in results["provenance"]["reused"]."""
    mine, theirs = results["provenance"], other.get("provenance", {})
    for key in ("teacher_sha256", "bank"):
        if mine.get(key) != theirs.get(key):
            raise ValueError(f"reuse: the other results have another {key}")
    copied = {}

    def take(section: str, entries: dict, source: dict, same=lambda a, b: True) -> None:
        for name, entry in source.items():
            if name in entries and same(entries[name], entry):
                for label in models:
                    if label in entry and label not in entries[name]:
                        entries[name][label] = entry[label]
                        copied[section] = copied.get(section, 0) + 1

    def seed(section: str, keys: tuple[str, ...], rows: str, fresh=lambda entry: {}) -> None:
        if section not in other:
            return
        mine_section = results.setdefault(section, {k: other[section][k] for k in keys if k in other[section]})
        if any(mine_section.get(k) != other[section].get(k) for k in keys):
            return
        entries = mine_section.setdefault(rows, {})
        for name, entry in other[section][rows].items():
            entries.setdefault(name, fresh(entry))
        take(section, entries, other[section][rows], lambda a, b: a.get("ids_sha256") == b.get("ids_sha256"))

    with_ids = lambda e: {k: e[k] for k in ("domain", "ids_sha256")}  # noqa: E731
    seed("perplexity", ("tokens",), "documents", with_ids)
    seed("long", ("tokens", "bins", "curve_tokens"), "documents", with_ids)
    seed("passkey", ("lengths", "depths", "trials"), "cells")
    if "chat" in other:
        entries = results.setdefault("chat", {})
        for prompt in other["chat"]:
            entries.setdefault(prompt, {})
        take("chat", entries, other["chat"])
    if "decode" in other and torch.cuda.is_available():
        if other["decode"].get("device") == torch.cuda.get_device_name():
            seed("decode", ("steps", "device"), "cells")
    mine["reused"] = {"delta_sha256": theirs["delta_sha256"], "models": list(models), "entries": copied}
    return copied


def smollm2_tokenizer(gguf: str | None):
    """SmolLM2's tokenizer: from its GGUF file where given, else from the installed package."""
    if gguf is None:
        from ttt_helpers.pretrained import load_pretrained

        return load_pretrained()[1]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(gguf).parent, gguf_file=Path(gguf).name)


def main() -> None:
    args = parse_args()
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.is_file() else {}
    bank = load_bank(args.bank)
    llama_cpu = load_teacher(args.gguf)
    tensors, info = pretrained.read_delta(args.delta)
    record_visit(results, path, args, info, llama_cpu, bank)
    shape = conversion(**info["conversion"])
    hybrid = bool(shape["attention_window"])
    if args.reuse is not None:
        other = json.loads(Path(args.reuse).read_text())
        # a hybrid's converted model is SmolLM2 with sinks and a window: not another delta's converted model
        reused = BASE_MODELS[:2] if hybrid else BASE_MODELS
        print("reused", reuse_base_models(results, other, reused), flush=True)
        save(results, path)
    tokenizer = smollm2_tokenizer(args.gguf)
    converted = from_llama(llama_cpu, **shape)
    ttt = from_llama(llama_cpu, **shape)
    pretrained.apply_delta(ttt, tensors, info)
    for model in (converted, ttt):
        model.set_ttt_impl(args.ttt_impl)
    plain = nullcontext
    window = sliding_window(llama_cpu, WINDOW)
    models = {
        "smollm2": (llama_cpu.to(DEVICE), plain),
        "smollm2_window": (window.to(DEVICE), plain),
        "converted": (converted.to(DEVICE), plain),
        "ttt": (ttt.to(DEVICE), plain),
        "ttt_eta0": (ttt, lambda: inner_lr_zero(ttt)),
    }
    sections = args.sections.split(",")
    t0 = time.perf_counter()
    if "perplexity" in sections:
        section_perplexity(
            {k: v for k, v in models.items() if k in ("smollm2", "converted", "ttt")},
            bank,
            results,
            path,
            args.max_docs,
        )
        print(f"perplexity done {time.perf_counter() - t0:.0f}s", flush=True)
    if "chat" in sections:
        section_chat({k: models[k] for k in ("smollm2", "ttt")}, tokenizer, results, path)
        print(f"chat done {time.perf_counter() - t0:.0f}s", flush=True)
    if "long" in sections:
        section_long(
            {k: v for k, v in models.items() if hybrid or k != "converted"},
            bank,
            results,
            path,
            args.max_docs,
            args.long_tokens,
        )
        print(f"long done {time.perf_counter() - t0:.0f}s", flush=True)
    if "passkey" in sections:
        section_passkey(
            {k: v for k, v in models.items() if hybrid or k != "converted"},
            tokenizer,
            results,
            path,
            {"smollm2": 10, "smollm2_window": 2},
            tuple(int(n) for n in args.passkey_lengths.split(",")),
        )
        print(f"passkey done {time.perf_counter() - t0:.0f}s", flush=True)
    if "decode" in sections:
        del models, window, converted
        section_decode(ttt.cpu(), llama_cpu.cpu(), results, path, args.decode_minutes)
        print(f"decode done {time.perf_counter() - t0:.0f}s", flush=True)
    summary(results)


def summary(results: dict) -> None:
    if "perplexity" in results:
        docs = results["perplexity"]["documents"].values()
        for domain in ("plays", "code", "pydocs"):
            rows = [d for d in docs if d["domain"] == domain]
            ppl = {
                m: math.exp(sum(d[m] for d in rows if m in d) / (len(rows) * (SHORT - 1)))
                for m in ("smollm2", "converted", "ttt")
            }
            print(domain, len(rows), {k: round(v, 2) for k, v in ppl.items()})
    if "long" in results:
        docs = list(results["long"]["documents"].values())
        for label in ("smollm2", "smollm2_window", "converted", "ttt", "ttt_eta0"):
            bins = {}
            for d in docs:
                for b, v in d.get(label, {}).get("bins", {}).items():
                    bins.setdefault(b, []).append(v)
            print(label, {b: round(float(np.mean(v)), 3) for b, v in bins.items()})
    if "passkey" in results:
        for cell, entry in results["passkey"]["cells"].items():
            print(cell, {k: v["correct"] for k, v in entry.items()})


if __name__ == "__main__":
    main()
