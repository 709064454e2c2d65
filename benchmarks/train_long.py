"""Does TTT use long context? Train one language model of the 125M shape at one context length
on the registry corpus (`python -m ttt_helpers.data build-corpus`), and record its held-out loss
by token index, on English and on code separately, inside the trained context and past it.

    python3 -m benchmarks.train_long --corpus corpus/ --model ttt-linear-m --context 8192 --tokens 100e6
    python3 -m benchmarks.train_long --dry-run --model ttt-linear-m   # tiny shapes, random tokens, CPU
    python3 -m benchmarks.train_long --dry-run --model llama --corpus corpus/   # tiny shapes, the corpus

Models (`benchmarks.language_models`) share the width, depth, heads, feed-forward width and
SmolLM2's vocabulary (49,152): llama, ttt-linear, ttt-linear-m (the paper's "TTT-Linear (M)"),
ttt-mlp-m, the control ttt-linear-m-lr0 (the inner state never leaves its learned W0), deltanet
and gated-deltanet (flash-linear-attention).
Training reads random windows of context tokens from the training documents (English and
code, each split concatenated in manifest order with a separator token between documents, so a
window of code reads neighbouring files of one package: `ttt_helpers.train.windows`); every model
sees the same windows in the same order (one seed). The loop is this script's own, not
`ttt_helpers.train`'s, which reads documents in consecutive segments and builds only its own
models: here any causal LM (a Llama, fla's DeltaNet) trains on random windows, with gradient
accumulation and weight decay on every parameter. Evaluation reads the first windows of
eval_factor x context tokens of the held-out English and code streams and averages the loss at each
token index (`ttt_helpers.metrics.per_position_loss`). Decoding is timed with
bf16 weights at batches 1 and 16 after prompts of --decode-lengths tokens: each model's own
cache, one eager forward per step. Each call adds its model to --out under its context length, rewriting the JSON atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.kernel_bench.timing import dry_provenance, provenance, results_path
from benchmarks.language_models import ARCHITECTURES, DRY_SHAPE, VOCAB, build
from ttt_helpers.metrics import per_position_loss
from ttt_helpers.model import TTT_STANDARD_CONFIGS
from ttt_helpers.train.loss import causal_lm_loss
from ttt_helpers.train.windows import RandomWindows, corpus_stream


def load_streams(args) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """Training stream (English then code), held-out streams by kind, and the corpus's provenance."""
    if args.corpus is None:  # a dry run without a corpus
        rng = np.random.default_rng(1)
        fake = lambda n: rng.integers(1, args.vocab, n)  # noqa: E731
        return fake(50_000), {"english": fake(4_000), "code": fake(4_000)}, {"corpus": "random tokens (dry run)"}
    from ttt_helpers.data.store import load_corpus

    corpus = load_corpus(args.corpus)
    m = corpus.manifest
    train = np.concatenate([corpus_stream(corpus, "train", k) for k in ("english", "code")])
    heldout = {k: corpus_stream(corpus, "heldout", k) for k in ("english", "code")}
    info = {key: m.get(key) for key in ("content_sha256", "tokens_sha256", "versions")}
    info["train_tokens"], info["heldout_tokens"] = int(train.size), {k: int(v.size) for k, v in heldout.items()}
    return train, heldout, info


def evaluate(model, heldout: dict, length: int, windows: int, device: str, bins: int) -> dict:
    """Loss by token index over the first `windows` windows of `length` tokens of each held-out
    stream, in `bins` equal bins, and the mean loss up to each power of two of positions."""
    result = {}
    for kind, tokens in heldout.items():
        n = min(windows, tokens.size // length)
        if n == 0:
            result[kind] = f"skipped: fewer than {length} held-out tokens"
            continue
        first_windows = torch.from_numpy(tokens[: n * length].copy())  # cut into its n windows
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            curve = per_position_loss(model, [first_windows], length=length).double()
        edges = np.linspace(0, length - 1, min(bins, length - 1) + 1).astype(int)  # no empty bin
        marks = [2**k for k in range(6, int(math.log2(length - 1)) + 1)]
        result[kind] = {
            "windows": n,
            "bin_edges": edges.tolist(),
            "binned": [float(curve[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])],
            "mean_up_to": {str(m): float(curve[:m].mean()) for m in marks},
            "mean_at": {str(m): float(curve[m // 2 : m].mean()) for m in marks},  # positions m/2 to m
        }
    return result


def decode_cost(
    model, prompt: np.ndarray, lengths: list[int], batches: tuple[int, ...], device: str, steps: int = 32
) -> dict:
    """Per-step decode time (ms) and memory (MiB) for each batch after prompts of each length (row r
    reads prompt[r * length:]): the cache's bytes after the prefill (memory in use beyond the
    weights) and the peak while decoding. One eager forward of one token per row and step, greedy,
    in the model's own dtype, each model with its own cache (a KV cache for the Llama, the
    recurrent states for the others)."""
    from ttt_helpers.compat import cache_kwargs, output_cache

    fla = type(model).__module__.startswith("fla.")  # fla's models name the cache past_key_values on any release

    def forward(ids: torch.Tensor, cache):
        kw = {"past_key_values": cache} if fla else cache_kwargs(cache)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
        cache = out.past_key_values if fla else output_cache(out)
        return out.logits[:, -1].argmax(-1, keepdim=True), cache

    result, cuda = {}, device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model.eval()
    for batch, length in ((b, n) for b in batches for n in lengths):
        key = f"B{batch}_T{length}"
        if prompt.size < batch * length:
            result[key] = f"skipped: {batch} prompts of {length} tokens need more held-out tokens"
            continue
        ids = torch.from_numpy(prompt[: batch * length].reshape(batch, length).copy()).to(device)
        with torch.no_grad():
            sync()
            base = torch.cuda.memory_allocated() if cuda else 0
            token, cache = forward(ids, None)
            sync()
            cache_bytes = torch.cuda.memory_allocated() - base if cuda else None
            for _ in range(4):  # warm-up
                token, cache = forward(token, cache)
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            for _ in range(steps):
                token, cache = forward(token, cache)
            sync()
            ms = (time.perf_counter() - started) / steps * 1e3
        result[key] = {
            "batch": batch,
            "prompt_tokens": length,
            "ms_per_step": ms,
            "tokens_per_s": batch / ms * 1e3,
            "cache_MiB": cache_bytes / 2**20 if cuda else None,
            "decode_peak_MiB_beyond_weights": (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None,
        }
        del cache, token
    model.train()
    return result


def train(args, model, train_tokens: np.ndarray, device: str) -> dict:
    """AdamW with warm-up and cosine decay under bf16 autocast (on CUDA), gradient clipping at 1;
    each optimizer step reads args.step_tokens tokens in micro-batches of args.batch windows."""
    windows = RandomWindows(train_tokens, args.context, args.batch, seed=args.seed)
    accum = max(1, args.step_tokens // (args.batch * args.context))
    steps = max(1, int(args.tokens) // (accum * args.batch * args.context))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 10)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses, step_seconds = [], []
    started = last = time.perf_counter()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        step_loss = torch.zeros((), device=device)
        for _ in range(accum):
            ids = windows.next_batch().to(device)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                if args.loss == "chunked":  # the same loss for every model, never holding the logits
                    loss = causal_lm_loss(model, ids) / accum
                else:
                    loss = model(input_ids=ids, labels=ids).loss / accum  # the models shift the labels
            loss.backward()
            step_loss += loss.detach()
        step_loss = step_loss.item()  # one host sync per optimizer step, not per micro-batch
        if not math.isfinite(step_loss):
            raise RuntimeError(f"the training loss is {step_loss} at step {step + 1}")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(step_loss, 5))
        now = time.perf_counter()
        step_seconds.append(round(now - last, 4))
        last = now
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            print(f"  step {step + 1}/{steps}: loss {step_loss:.4f}", flush=True)
    seconds = time.perf_counter() - started
    tokens = steps * accum * args.batch * args.context
    steady = step_seconds[3:] or step_seconds  # past the steps that compile kernels
    return {
        "steps": steps,
        "tokens": tokens,
        "windows_per_step": accum * args.batch,
        "losses": losses,
        "train_seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "steady_tokens_per_s": accum * args.batch * args.context / float(np.median(steady)),
        "step_seconds": step_seconds,  # the first ones include compiling the kernels
        "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def lengths_list(text: str) -> list[int]:
    """ "2048,8192" -> [2048, 8192]; argparse reports anything else as a usage error."""
    try:
        lengths = [int(n) for n in text.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive token counts separated by commas, got {text!r}")
    return lengths


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked; a dry run's tiny shapes set in place of the given ones."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=ARCHITECTURES)
    parser.add_argument("--corpus", type=Path, help="a corpus folder (manifest.json and tokens.u16[.xz])")
    parser.add_argument("--context", type=int, default=8192, help="training context in tokens")
    parser.add_argument("--tokens", type=float, default=100e6, help="training tokens (rounded down to whole steps)")
    parser.add_argument("--batch", type=int, default=8, help="windows per micro-batch")
    parser.add_argument("--step-tokens", type=int, default=2**19, help="tokens per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--loss",
        choices=("chunked", "logits"),
        default="chunked",
        help="the training loss: chunked (ttt_helpers.train.loss, no [tokens, vocab] logits) or each model's own",
    )
    parser.add_argument("--eval-factor", type=int, default=4, help="evaluation windows of this many contexts")
    parser.add_argument("--eval-windows", type=int, default=24, help="held-out windows per kind (at most)")
    parser.add_argument("--decode-lengths", type=lengths_list, default=[2048, 8192, 32768],
                        help="prompt lengths (comma-separated) to time decoding after")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="JSON (default results/long_context_<gpu>.json)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes and random tokens, on the CPU if need be")
    parser.add_argument(
        "--save-model", type=Path, default=None, help="a new folder for the trained model (safetensors)"
    )
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not args.dry_run and (not cuda or args.corpus is None):
        parser.error("a real run needs a CUDA GPU and --corpus; --dry-run runs it tiny anywhere")
    if args.context < 16 or args.batch < 1 or args.tokens <= 0 or args.eval_factor < 1:
        parser.error("--context must be >= 16, --batch >= 1, --tokens > 0 and --eval-factor >= 1")
    if args.save_model is not None and args.save_model.exists():
        parser.error(f"--save-model {args.save_model} exists: give a new folder, a saved model is never overwritten")
    if args.dry_run:
        args.context, args.tokens, args.batch, args.step_tokens, args.eval_windows = 64, 2 * 64 * 2, 2, 128, 2
        args.decode_lengths = [64, 128]
        if not cuda:
            os.environ.setdefault("TRITON_INTERPRET", "1")
    args.vocab = 256 if args.dry_run and args.corpus is None else VOCAB
    return args


def write_run(out: Path, context: int, model: str, run: dict) -> None:
    """Add `run` to the JSON `out` under its context and model, rewriting the file atomically."""
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault(str(context), {})[model] = run
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".json.partial")
    partial.write_text(json.dumps(results, indent=1) + "\n")
    partial.replace(out)  # never a half-written JSON


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    prov = provenance() if cuda else dry_provenance()
    out = args.out or (Path("/tmp/long_context_dry_run.json") if args.dry_run else results_path("long_context", prov))
    train_tokens, heldout, corpus_info = load_streams(args)
    torch.manual_seed(args.seed)
    shape = DRY_SHAPE if args.dry_run else TTT_STANDARD_CONFIGS["125m"]
    model = build(args.model, shape, args.vocab, args.context).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params / 1e6:.1f}M parameters, context {args.context}, {prov['gpu']}", flush=True)
    run = {"model": args.model, "parameters": params, "shape": shape, "context": args.context, "lr": args.lr}
    run["training"] = train(args, model, train_tokens, device)
    if args.save_model is not None:
        model.save_pretrained(args.save_model)  # safetensors, float32
        run["saved_model"] = str(args.save_model)
    length = args.eval_factor * args.context
    run["heldout"] = evaluate(model, heldout, length, args.eval_windows, device, bins=64 * args.eval_factor)
    if device == "cuda":
        model.to(torch.bfloat16)  # decoding as a user would run it: the weights in bf16
    run["decode"] = decode_cost(model, heldout["code"], args.decode_lengths, (1, 16), device)
    run["corpus"], run["provenance"] = corpus_info, prov
    write_run(out, args.context, args.model, run)
    t = run["training"]
    print(f"wrote {out}: {t['tokens']:,} tokens at {t['tokens_per_s']:,.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
