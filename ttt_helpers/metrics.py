"""Evaluation metrics for causal language models: perplexity, loss by position, latency, memory,
and distances between two models' next-token distributions.

Every function takes a model whose forward accepts `input_ids` [B, T] and returns an object with
`.logits` [B, T, V] (the Hugging Face interface), so a pretrained Llama and a TTT model are
measured by the same code.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compat import cache_kwargs, output_cache

# ---------------------------------------------------------------- helpers


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the duration; the model's previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _documents(token_ids: Tensor | Sequence[Tensor], name: str) -> list[Tensor]:
    """One 1-D LongTensor or a non-empty list of them, as a list."""
    docs = [token_ids] if isinstance(token_ids, Tensor) else list(token_ids)
    if not docs:
        raise ValueError(f"{name} must hold at least one document, got an empty list")
    for i, doc in enumerate(docs):
        if not isinstance(doc, Tensor) or doc.dim() != 1 or doc.dtype != torch.long:
            got = f"{doc.dim()}-D {doc.dtype} tensor" if isinstance(doc, Tensor) else type(doc).__name__
            raise ValueError(f"{name}[{i}] must be a 1-D LongTensor of token ids, got a {got}")
    return docs


def _next_token_nll(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Negative log-likelihood (nats) of `targets` after each input position. inputs, targets: [T] -> [T]"""
    logits = model(input_ids=inputs[None]).logits[0]
    return F.cross_entropy(logits.float(), targets, reduction="none")


# ---------------------------------------------------------------- perplexity


class PerplexityResult(NamedTuple):
    """perplexity = exp(nll); nll = mean negative log-likelihood in nats per scored token."""

    perplexity: float
    nll: float
    tokens: int


def perplexity(model: nn.Module, token_ids: Tensor | Sequence[Tensor], *, window: int, stride: int) -> PerplexityResult:
    """Sliding-window perplexity of one document [N] or a corpus (a list of documents).

    The model reads `window` tokens at a time and predicts the token after each of them. The
    first window starts at the document's start; each next one starts `stride` tokens later and
    scores only the targets no earlier window scored. So every token but the document's first is
    scored exactly once, with between `window - stride + 1` and `window` tokens of context (fewer
    only near the start). `stride == window` is plain chunking; a smaller stride gives each token
    more context at the price of about `window / stride` times more compute. Documents are scored
    separately and the result is weighted by token. A document of at most `window + 1` tokens is
    one window: `exp(model(ids, labels=ids).loss)`.
    """
    docs = _documents(token_ids, "token_ids")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and window={window}, got {stride}")
    for i, doc in enumerate(docs):
        if doc.numel() < 2:
            raise ValueError(f"token_ids[{i}] must have at least 2 tokens, got {doc.numel()}")
    device = _device(model)
    total, count = 0.0, 0
    with _evaluating(model):
        for doc in docs:
            doc = doc.to(device)
            last = doc.numel() - 1  # inputs are doc[:last]; targets doc[1:]
            scored = 0  # targets doc[1 : scored + 1] are done
            for start in range(0, last, stride):
                stop = min(start + window, last)
                nll = _next_token_nll(model, doc[start:stop], doc[start + 1 : stop + 1])
                total += nll[scored - start :].double().sum().item()
                count += stop - scored
                scored = stop
                if stop == last:
                    break
    nll = total / count
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=count)


def per_position_loss(model: nn.Module, documents: Sequence[Tensor], *, length: int) -> Tensor:
    """Mean next-token loss (nats) at each position of a `length`-token window. -> [length - 1]

    Entry i is the loss of predicting token i + 1 from tokens 0..i. Every document (1-D, at least
    `length` tokens) is cut into its non-overlapping windows of `length` tokens, a remainder
    shorter than `length` is dropped, and the curve is the mean over all windows. A model that
    keeps using its context has a curve that keeps falling.
    """
    docs = _documents(documents, "documents")
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    for i, doc in enumerate(docs):
        if doc.numel() < length:
            raise ValueError(f"documents[{i}] must have at least length={length} tokens, got {doc.numel()}")
    device = _device(model)
    total, windows = torch.zeros(length - 1, dtype=torch.float64, device=device), 0
    with _evaluating(model):
        for doc in docs:
            doc = doc.to(device)
            for start in range(0, doc.numel() - length + 1, length):
                window = doc[start : start + length]
                total += _next_token_nll(model, window[:-1], window[1:]).double()
                windows += 1
    return (total / windows).float().cpu()


# ---------------------------------------------------------------- length generalization


class LengthRow(NamedTuple):
    """One evaluation length: perplexity and tokens are None and 0 where the data cannot fill it."""

    ratio: float
    length: int
    perplexity: float | None
    tokens: int


@dataclass
class LengthGeneralization:
    """Perplexity against evaluation length for a model trained on `train_window` tokens."""

    train_window: int
    rows: list[LengthRow]
    at_1x: float | None
    at_5x: float | None
    at_10x: float | None
    best_length: int
    degradation: float  # worst / best perplexity over the evaluated lengths

    def plot(self, ax=None):
        """Perplexity vs evaluation length (log x), a dashed line at the training window. -> Axes"""
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
        done = [r for r in self.rows if r.perplexity is not None]
        ax.plot([r.length for r in done], [r.perplexity for r in done], "o-", label="evaluated")
        ax.axvline(self.train_window, color="gray", linestyle="--", label=f"training window ({self.train_window})")
        ax.set_xscale("log")
        ticks = [r.length for r in done][:: math.ceil(len(done) / 8)]  # at most 8 labelled lengths
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"Perplexity by evaluation length (worst / best = {self.degradation:.2f})")
        ax.legend()
        return ax


def length_generalization(
    model: nn.Module,
    documents: Sequence[Tensor],
    *,
    train_window: int,
    ratios: Sequence[float] | None = None,
    n: int = 20,
) -> LengthGeneralization:
    """Perplexity at evaluation lengths `L = round(ratio * train_window)`.

    Default ratios: n values linearly spaced from 0.5 to 10 (n=20 gives 0.5, 1.0, ..., 10.0, so
    1x, 5x and 10x are on the grid). At length L each document is cut into non-overlapping
    windows of L input tokens, each predicting the L tokens after its positions (`perplexity`
    with window = stride = L on the document truncated to whole windows), so a document needs at
    least L + 1 tokens. Lengths no document can fill are kept in the table with perplexity None.
    Different lengths score slightly different tokens unless the document lengths minus one are
    multiples of every L.
    """
    docs = _documents(documents, "documents")
    if train_window < 2:
        raise ValueError(f"train_window must be >= 2, got {train_window}")
    if ratios is None:
        if n < 2:
            raise ValueError(f"n must be >= 2, got {n}")
        ratios = torch.linspace(0.5, 10.0, n, dtype=torch.float64).tolist()
    ratios = sorted(float(r) for r in ratios)
    if not ratios or ratios[0] <= 0:
        raise ValueError(f"ratios must be a non-empty list of positive numbers, got {ratios}")
    rows, seen = [], set()
    for ratio in ratios:
        length = max(2, round(ratio * train_window))
        if length in seen:
            continue
        seen.add(length)
        fitting = [d[: (d.numel() - 1) // length * length + 1] for d in docs if d.numel() > length]
        if not fitting:
            rows.append(LengthRow(ratio, length, None, 0))
            continue
        result = perplexity(model, fitting, window=length, stride=length)
        rows.append(LengthRow(ratio, length, result.perplexity, result.tokens))
    done = [r for r in rows if r.perplexity is not None]
    if not done:
        raise ValueError(
            f"documents are too short for every length: the shortest length needs {rows[0].length + 1} tokens"
        )
    at = {r.length: r.perplexity for r in rows}
    best = min(done, key=lambda r: r.perplexity)
    return LengthGeneralization(
        train_window=train_window,
        rows=rows,
        at_1x=at.get(train_window),
        at_5x=at.get(5 * train_window),
        at_10x=at.get(10 * train_window),
        best_length=best.length,
        degradation=max(r.perplexity for r in done) / best.perplexity,
    )


# ---------------------------------------------------------------- latency and memory


@dataclass
class Spread:
    """Median, minimum and maximum over repeats."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


@dataclass
class LatencyResult:
    """Timings of greedy generation with a KV cache, over `repeats` runs after warm-up.

    prefill_tokens_per_s: batch * prompt_len / prefill time.
    time_to_first_token_s: prefill of the prompt plus picking the first new token.
    decode_tokens_per_s: batch * (new_tokens - 1) / time of the decode steps.
    step_latency_s[i]: median over repeats of decode step i, which attends to step_context[i] tokens.
    peak_memory_bytes: on CUDA `torch.cuda.max_memory_allocated` (tensors only, weights included);
    on the CPU the peak resident set size of the whole process during the run, sampled from
    /proc/self/status about every millisecond (None where /proc is missing).
    """

    device: str
    batch: int
    prompt_len: int
    new_tokens: int
    repeats: int
    prefill_tokens_per_s: Spread
    time_to_first_token_s: Spread
    decode_tokens_per_s: Spread
    step_context: list[int]
    step_latency_s: list[float]
    peak_memory_bytes: Spread | None
    memory_measure: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakRss:
    """Peak resident set size of this process while the `with` block runs, sampled in a thread."""

    STATUS = Path("/proc/self/status")

    def __init__(self, interval_s: float = 0.001):
        self.interval_s, self.peak = interval_s, 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        for line in self.STATUS.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # the file reports kB
        return 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> _PeakRss:
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def _greedy_decode(model: nn.Module, prompt: Tensor, new_tokens: int) -> tuple[Tensor, float, list[float]]:
    """Greedy generation with the model's KV cache, timing each forward. prompt: [B, T]

    Returns the new tokens [B, new_tokens], the time to the first token (the prefill) and the
    times of the new_tokens - 1 decode steps, each one token per sequence.
    """
    device = prompt.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    first = time.perf_counter() - t0
    cache, tokens, steps = output_cache(out), [token], []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        out = model(input_ids=token, use_cache=True, **cache_kwargs(cache))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        steps.append(time.perf_counter() - t0)
        cache = output_cache(out)
        tokens.append(token)
    return torch.cat(tokens, dim=1), first, steps


def latency(
    model: nn.Module,
    *,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    vocab_size: int | None = None,
    warmup: int = 1,
) -> LatencyResult:
    """Prefill and decode speed, time to first token and peak memory of greedy generation.

    The prompt is `batch` rows of `prompt_len` random token ids (seed 0, below `vocab_size`,
    default `model.config.vocab_size`); `new_tokens` (>= 2) tokens are generated per row, the
    first by the prefill, the rest by one cached decode step each. `warmup` untimed runs come
    first, then `repeats` timed ones.
    """
    for name, value, low in (
        ("batch", batch, 1),
        ("prompt_len", prompt_len, 1),
        ("new_tokens", new_tokens, 2),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
    ):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    vocab = vocab_size if vocab_size is not None else getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None or vocab < 1:
        raise ValueError(f"vocab_size must be >= 1 (or the model must have config.vocab_size), got {vocab}")
    device = _device(model)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(vocab, (batch, prompt_len), generator=gen).to(device)
    on_cuda = device.type == "cuda"
    track_rss = not on_cuda and _PeakRss.STATUS.exists()
    firsts, decodes, steps, peaks = [], [], [], []
    with _evaluating(model):
        for _ in range(warmup):
            _greedy_decode(model, prompt, new_tokens)
        for _ in range(repeats):
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(device)
                _, first, step = _greedy_decode(model, prompt, new_tokens)
                peaks.append(torch.cuda.max_memory_allocated(device))
            elif track_rss:
                with _PeakRss() as rss:
                    _, first, step = _greedy_decode(model, prompt, new_tokens)
                peaks.append(rss.peak)
            else:
                _, first, step = _greedy_decode(model, prompt, new_tokens)
            firsts.append(first)
            decodes.append(sum(step))
            steps.append(step)
    decoded = batch * (new_tokens - 1)
    return LatencyResult(
        device=str(device),
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        repeats=repeats,
        prefill_tokens_per_s=Spread.of([batch * prompt_len / t for t in firsts]),
        time_to_first_token_s=Spread.of(firsts),
        decode_tokens_per_s=Spread.of([decoded / t for t in decodes]),
        step_context=[prompt_len + i + 1 for i in range(new_tokens - 1)],
        step_latency_s=[statistics.median(times) for times in zip(*steps)],
        peak_memory_bytes=Spread.of(peaks) if peaks else None,
        memory_measure="cuda max_memory_allocated" if on_cuda else ("peak RSS" if track_rss else "unavailable"),
    )


# ---------------------------------------------------------------- distribution distances


def _check_pair(p_logits: Tensor, q_logits: Tensor) -> None:
    if p_logits.dim() < 1 or p_logits.shape[-1] < 1:
        raise ValueError(f"p_logits must have shape [..., V] with V >= 1, got {tuple(p_logits.shape)}")
    if q_logits.shape != p_logits.shape:
        raise ValueError(
            f"q_logits must have the shape of p_logits {tuple(p_logits.shape)}, got {tuple(q_logits.shape)}"
        )


def total_variation(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Total variation distance `0.5 * sum_v |p_v - q_v|` per position, in [0, 1]. [..., V] -> [...]"""
    _check_pair(p_logits, q_logits)
    p, q = p_logits.float().softmax(-1), q_logits.float().softmax(-1)
    return 0.5 * (p - q).abs().sum(-1)


def max_abs_diff(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Largest probability difference `max_v |p_v - q_v|` per position. [..., V] -> [...]

    The benchmark of the original TTT kernels called this number "total variation"; it is at
    most the true total variation distance (`total_variation`) and can be much smaller.
    """
    _check_pair(p_logits, q_logits)
    p, q = p_logits.float().softmax(-1), q_logits.float().softmax(-1)
    return (p - q).abs().amax(-1)


def kl_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) in nats per position, from log_softmax. [..., V] -> [...]

    Terms with p_v = 0 count as 0; where q_v = 0 < p_v the result is inf.
    """
    _check_pair(p_logits, q_logits)
    log_p, log_q = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def argmax_mismatch(p_logits: Tensor, q_logits: Tensor) -> float:
    """Percentage of positions where the two distributions' most likely tokens differ."""
    _check_pair(p_logits, q_logits)
    return 100.0 * (p_logits.argmax(-1) != q_logits.argmax(-1)).float().mean().item()
