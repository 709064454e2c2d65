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

from . import checks
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


def check_token_documents(
    token_ids: Tensor | Sequence[Tensor], name: str, vocab_size: int | None = None
) -> list[Tensor]:
    """One 1-D LongTensor or a non-empty list of them, as a list; every id in [0, vocab_size)."""
    if not isinstance(token_ids, (Tensor, list, tuple)):
        raise TypeError(f"{name} must be a 1-D LongTensor or a list of them, got {type(token_ids).__name__}")
    docs = [token_ids] if isinstance(token_ids, Tensor) else list(token_ids)
    if not docs:
        raise ValueError(f"{name} must hold at least one document, got an empty list")
    for i, doc in enumerate(docs):
        if not isinstance(doc, Tensor) or doc.dim() != 1 or doc.dtype != torch.long:
            got = f"{doc.dim()}-D {doc.dtype} tensor" if isinstance(doc, Tensor) else type(doc).__name__
            raise ValueError(f"{name}[{i}] must be a 1-D LongTensor of token ids, got a {got}")
        checks.token_ids(f"{name}[{i}]", doc, vocab_size)
    return docs


def _model_vocab_size(model: nn.Module) -> int | None:
    """Check that `model` is a module with parameters; returns its vocabulary size where known."""
    checks.module("model", model)
    if next(model.parameters(), None) is None:
        raise ValueError("model must have parameters (its device is where the inputs go), got none")
    return checks.model_vocab_size(model)


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
    docs = check_token_documents(token_ids, "token_ids", _model_vocab_size(model))
    checks.integer("window", window, 2)
    if not 1 <= checks.integer("stride", stride) <= window:
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
    docs = check_token_documents(documents, "documents", _model_vocab_size(model))
    checks.integer("length", length, 2)
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


def bits_per_byte(nll_sum: float, text: str | bytes) -> float:
    """Bits per UTF-8 byte of `text`, from the summed next-token NLL (nats) of the tokens that spell it.

    nll_sum / ln 2 is the code length of the text in bits under the model; dividing by the text's
    UTF-8 bytes instead of its tokens makes models with different tokenizers comparable (a
    byte-level model's per-byte loss in nats gives the same number: loss / ln 2). `text` must be
    exactly what the scored tokens spell: for a token-level model that scores tokens 1..N of a
    passage, `tokenizer.decode(ids[1:])`. A perplexity result gives nll_sum = nll * tokens.
    """
    nll_sum = checks.real("nll_sum", nll_sum, 0)
    if isinstance(text, str):
        n_bytes = len(text.encode("utf-8"))
    elif isinstance(text, (bytes, bytearray)):
        n_bytes = len(text)
    else:
        raise TypeError(f"text must be the scored text as a str or bytes, got {type(text).__name__}")
    if n_bytes == 0:
        raise ValueError("text must hold at least one byte: the bits are divided by its length")
    return nll_sum / math.log(2) / n_bytes


# ---------------------------------------------------------------- intervals


class Interval(NamedTuple):
    """A mean over n values and its two-sided confidence interval [low, high]."""

    mean: float
    low: float
    high: float
    n: int


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return h


def _beta_regularized(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    """Student's t distribution function with df degrees of freedom."""
    tail = 0.5 * _beta_regularized(df / 2, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t distribution with df degrees of freedom (bisection on its
    distribution function, to about 1e-12). t_quantile(0.975, 29) = 2.0452..."""
    p = checks.real("p", p, 0, 1, low_open=True, high_open=True)
    df = checks.positive("df", df)
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_cdf(mid, df) < p else (low, mid)
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2


def mean_interval(values: Sequence[float] | Tensor, confidence: float = 0.95) -> Interval:
    """Mean of `values` with its Student-t confidence interval, mean +- t * sd / sqrt(n).

    The interval is for the mean of the population the values were drawn from, assuming they are
    independent draws (windows of text, seeds, facts): were the experiment repeated, about
    `confidence` of such intervals would contain that mean. It says nothing of a single new draw,
    which spreads about sqrt(n) times wider. Needs at least 2 finite values.
    """
    if isinstance(values, Tensor):
        values = values.detach().double().reshape(-1).tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"values must be a sequence of numbers or a tensor, got {type(values).__name__}")
    values = [checks.real(f"values[{i}]", v) for i, v in enumerate(values)]
    if len(values) < 2:
        raise ValueError(f"values must hold at least 2 numbers for an interval, got {len(values)}")
    confidence = checks.real("confidence", confidence, 0, 1, low_open=True, high_open=True)
    n, mean = len(values), math.fsum(values) / len(values)
    half = t_quantile(0.5 + confidence / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean=mean, low=mean - half, high=mean + half, n=n)


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


def evaluation_lengths(
    documents: Sequence[Tensor],
    *,
    train_window: int,
    ratios: Sequence[float] | None = None,
    n: int = 20,
    name: str = "documents",
) -> list[tuple[float, int]]:
    """The (ratio, length) pairs `length_generalization` evaluates, checked without a model.

    Raises what `length_generalization` would raise for these settings, also where no document
    is long enough for any length, so a training run can check its evaluation before it starts.
    """
    docs = check_token_documents(documents, name)
    checks.integer("train_window", train_window, 2)
    if ratios is None:
        checks.integer("n", n, 2)
        ratios = torch.linspace(0.5, 10.0, n, dtype=torch.float64).tolist()
    good = lambda r: isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0
    if (
        isinstance(ratios, (str, Tensor))
        or not isinstance(ratios, Sequence)
        or not ratios
        or not all(map(good, ratios))
    ):
        raise ValueError(f"ratios must be a non-empty list of positive numbers (finite), got {ratios!r}")
    ratios = sorted(float(r) for r in ratios)
    plan, seen = [], set()
    for ratio in ratios:
        length = max(2, round(ratio * train_window))
        if length not in seen:
            seen.add(length)
            plan.append((ratio, length))
    longest = max(d.numel() for d in docs)
    if longest <= plan[0][1]:
        raise ValueError(
            f"{name} are too short for every length: the shortest evaluation length ({plan[0][1]}, "
            f"{plan[0][0]:g}x the window of {train_window}) needs {plan[0][1] + 1} tokens, the longest document has {longest}"
        )
    return plan


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
    docs = check_token_documents(documents, "documents", _model_vocab_size(model))
    rows = []
    for ratio, length in evaluation_lengths(docs, train_window=train_window, ratios=ratios, n=n):
        fitting = [d[: (d.numel() - 1) // length * length + 1] for d in docs if d.numel() > length]
        if not fitting:
            rows.append(LengthRow(ratio, length, None, 0))
            continue
        result = perplexity(model, fitting, window=length, stride=length)
        rows.append(LengthRow(ratio, length, result.perplexity, result.tokens))
    done = [r for r in rows if r.perplexity is not None]
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
        checks.integer(name, value, low)
    vocab = _prompt_vocab_size(model, vocab_size)
    device = _device(model)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(vocab, (batch, prompt_len), generator=gen).to(device)
    on_cuda = device.type == "cuda"
    track_rss = not on_cuda and _PeakRss.STATUS.exists()
    firsts, steps, peaks = _timed_runs(model, prompt, new_tokens, repeats, warmup, track_rss)
    decoded = batch * (new_tokens - 1)
    return LatencyResult(
        device=str(device),
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        repeats=repeats,
        prefill_tokens_per_s=Spread.of([batch * prompt_len / t for t in firsts]),
        time_to_first_token_s=Spread.of(firsts),
        decode_tokens_per_s=Spread.of([decoded / sum(step) for step in steps]),
        step_context=[prompt_len + i + 1 for i in range(new_tokens - 1)],
        step_latency_s=[statistics.median(times) for times in zip(*steps)],
        peak_memory_bytes=Spread.of(peaks) if peaks else None,
        memory_measure="cuda max_memory_allocated" if on_cuda else ("peak RSS" if track_rss else "unavailable"),
    )


def _prompt_vocab_size(model: nn.Module, vocab_size: int | None) -> int:
    """The ids a random prompt draws from: `vocab_size`, at most the model's, which is the default."""
    model_vocab = _model_vocab_size(model)
    vocab = checks.optional_integer("vocab_size", vocab_size, 1) if vocab_size is not None else model_vocab
    if vocab is None:
        raise ValueError("vocab_size must be given where the model has no config.vocab_size")
    if model_vocab is not None and vocab > model_vocab:
        raise ValueError(f"vocab_size ({vocab}) must be at most the model's config.vocab_size ({model_vocab})")
    return vocab


def _timed_runs(
    model: nn.Module, prompt: Tensor, new_tokens: int, repeats: int, warmup: int, track_rss: bool
) -> tuple[list[float], list[list[float]], list[int]]:
    """`warmup` untimed runs of `_greedy_decode`, then `repeats` timed ones in eval mode without
    gradients. -> (times to the first token, each run's step times, each run's peak memory: CUDA's
    peak allocation, the peak RSS where track_rss, else none)"""
    device = prompt.device
    firsts, steps, peaks = [], [], []
    with _evaluating(model):
        for _ in range(warmup):
            _greedy_decode(model, prompt, new_tokens)
        for _ in range(repeats):
            if device.type == "cuda":
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
            steps.append(step)
    return firsts, steps, peaks


# ---------------------------------------------------------------- distribution distances


def _check_pair(p_logits: Tensor, q_logits: Tensor) -> None:
    checks.tensor("p_logits", p_logits)
    checks.tensor("q_logits", q_logits)
    if not p_logits.is_floating_point() or not q_logits.is_floating_point():
        raise ValueError(
            f"p_logits and q_logits must be floating-point logits, got {p_logits.dtype} and {q_logits.dtype}"
        )
    if p_logits.dim() < 1 or p_logits.shape[-1] < 1:
        raise ValueError(f"p_logits must have shape [..., V] with V >= 1, got {tuple(p_logits.shape)}")
    if q_logits.shape != p_logits.shape:
        raise ValueError(
            f"q_logits must have the shape of p_logits {tuple(p_logits.shape)}, got {tuple(q_logits.shape)}"
        )
    for name, logits in (("p_logits", p_logits), ("q_logits", q_logits)):
        _check_distribution(name, logits)


def _check_distribution(name: str, logits: Tensor) -> None:
    """Raise unless every position of logits [..., V] is a distribution: no NaN or +inf, and at
    least one finite logit (-inf is a token of probability 0; all -inf is no distribution)."""
    if bool((torch.isnan(logits) | (logits == math.inf)).any()):
        raise ValueError(f"{name} holds NaN or +inf: logits must be finite, or -inf for a token of probability 0")
    empty = (logits == -math.inf).all(-1)
    if bool(empty.any()):
        where = tuple(empty.nonzero()[0].tolist())
        raise ValueError(f"{name} at position {where} is -inf for every token: that is not a distribution")


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
    if p_logits[..., 0].numel() == 0:
        raise ValueError(f"p_logits must hold at least one position, got shape {tuple(p_logits.shape)}")
    return 100.0 * (p_logits.argmax(-1) != q_logits.argmax(-1)).float().mean().item()
