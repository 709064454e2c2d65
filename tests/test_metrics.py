"""Evaluation metrics: perplexity, loss by position, length generalization, latency, distances."""

import math
import statistics
from types import SimpleNamespace

import matplotlib
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ttt_helpers import metrics

matplotlib.use("Agg")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


class Bigram(nn.Module):
    """Logits at each position are a fixed row of a table chosen by the current token."""

    def __init__(self, vocab: int, gen: torch.Generator):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=gen))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])

    def hand_nll(self, doc: torch.Tensor) -> torch.Tensor:
        """Per-target NLL computed directly from the table. [N] -> [N - 1]"""
        log_p = torch.log_softmax(self.table.detach().double(), -1)
        return -log_p[doc[:-1], doc[1:]]


class ContextCounter(nn.Module):
    """Puts probability k / (k + V - 1) on token 0 after k tokens of context in its input window."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, input_ids):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        logits[..., 0] = torch.arange(1, T + 1).log()
        return SimpleNamespace(logits=logits)

    def nll(self, context: int) -> float:
        return -math.log(context / (context + self.vocab - 1))


def expected_contexts(n: int, window: int, stride: int) -> list[int]:
    """Context of each target 1..n-1 under the sliding-window rule, in closed form: a target p is
    scored by the first window (starts 0, stride, 2*stride, ...) whose inputs reach p - 1."""
    contexts = []
    for p in range(1, n):
        start = max(0, math.ceil((p - window) / stride)) * stride
        contexts.append(p - start)
    return contexts


# ---------------------------------------------------------------- perplexity


@pytest.mark.parametrize("length", [24, 17])
def test_one_window_equals_the_model_loss(rng, length):
    model = tiny_llama()
    ids = torch.randint(64, (length,), generator=rng)
    result = metrics.perplexity(model, ids, window=24, stride=24)
    loss = model(input_ids=ids[None], labels=ids[None]).loss
    assert result.tokens == length - 1
    assert result.nll == pytest.approx(loss.item(), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(loss.item()), rel=1e-5)


@pytest.mark.parametrize("window,stride", [(2, 1), (5, 5), (8, 3), (16, 1), (40, 40), (9, 8)])
def test_every_token_is_scored_once(rng, window, stride):
    model = Bigram(11, rng)
    docs = [torch.randint(11, (n,), generator=rng) for n in (2, 7, 33, 50)]
    result = metrics.perplexity(model, docs, window=window, stride=stride)
    hand = torch.cat([model.hand_nll(d) for d in docs])
    assert result.tokens == sum(len(d) - 1 for d in docs) == hand.numel()
    assert result.nll == pytest.approx(hand.mean().item(), rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(hand.mean().item()), rel=1e-6)


@pytest.mark.parametrize("window,stride", [(4, 4), (8, 2), (8, 7), (10, 1), (64, 64)])
def test_context_of_each_scored_token(window, stride):
    model = ContextCounter(vocab=5)
    doc = torch.zeros(41, dtype=torch.long)
    contexts = expected_contexts(41, window, stride)
    assert all(min(p, window - stride + 1) <= c <= window for p, c in zip(range(1, 41), contexts))
    result = metrics.perplexity(model, doc, window=window, stride=stride)
    hand = sum(model.nll(c) for c in contexts) / len(contexts)
    assert result.tokens == 40
    assert result.nll == pytest.approx(hand, rel=1e-6)


def test_smaller_stride_gives_more_context():
    model = ContextCounter(vocab=5)
    doc = torch.zeros(200, dtype=torch.long)
    nlls = [metrics.perplexity(model, doc, window=32, stride=s).nll for s in (32, 16, 4, 1)]
    assert nlls == sorted(nlls, reverse=True) and nlls[0] > nlls[-1]


def test_perplexity_restores_training_mode(rng):
    model = tiny_llama().train()
    metrics.perplexity(model, torch.randint(64, (10,), generator=rng), window=4, stride=2)
    assert model.training


# ---------------------------------------------------------------- per-position loss


def test_per_position_loss_by_hand(rng):
    model = Bigram(7, rng)
    docs = [torch.randint(7, (n,), generator=rng) for n in (12, 25, 30)]
    curve = metrics.per_position_loss(model, docs, length=12)
    windows = [d[s : s + 12] for d in docs for s in range(0, len(d) - 11, 12)]
    assert len(windows) == 1 + 2 + 2
    hand = torch.stack([model.hand_nll(w) for w in windows]).mean(0)
    assert curve.shape == (11,)
    torch.testing.assert_close(curve.double(), hand, rtol=1e-6, atol=1e-6)


def test_per_position_loss_falls_with_context():
    model = ContextCounter(vocab=9)
    curve = metrics.per_position_loss(model, [torch.zeros(50, dtype=torch.long)] * 2, length=16)
    hand = torch.tensor([model.nll(k) for k in range(1, 16)])
    torch.testing.assert_close(curve.double(), hand.double(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- length generalization


def test_length_generalization_skips_lengths_the_data_cannot_fill(rng):
    model = Bigram(13, rng)
    docs = [torch.randint(13, (n,), generator=rng) for n in (301, 150)]
    result = metrics.length_generalization(model, docs, train_window=60, ratios=[0.5, 1, 2, 5, 10])
    assert [r.length for r in result.rows] == [30, 60, 120, 300, 600]
    assert [r.perplexity is None for r in result.rows] == [False, False, False, False, True]
    assert result.rows[-1].tokens == 0
    # L=300 fits only the 301-token document; L=120 uses 2 windows of it and 1 of the other
    assert result.rows[3].tokens == 300 and result.rows[2].tokens == 240 + 120
    short = [d[: (len(d) - 1) // 120 * 120 + 1] for d in docs]
    assert result.rows[2].perplexity == pytest.approx(
        metrics.perplexity(model, short, window=120, stride=120).perplexity
    )
    assert result.at_1x == result.rows[1].perplexity and result.at_5x == result.rows[3].perplexity
    assert result.at_10x is None
    done = [r.perplexity for r in result.rows if r.perplexity is not None]
    assert result.degradation == pytest.approx(max(done) / min(done))
    assert result.best_length == result.rows[done.index(min(done))].length
    ax = result.plot()
    assert ax.get_xscale() == "log" and len(ax.lines) == 2


def test_length_generalization_default_grid_and_context_effect():
    model = ContextCounter(vocab=5)
    result = metrics.length_generalization(model, [torch.zeros(401, dtype=torch.long)], train_window=20)
    assert [r.ratio for r in result.rows] == pytest.approx([0.5 * k for k in range(1, 21)])
    assert [r.length for r in result.rows] == [10 * k for k in range(1, 21)]
    # this model only improves with context, so the longest window is best
    assert result.best_length == 200 and result.at_10x == min(r.perplexity for r in result.rows)
    assert result.degradation > 1


# ---------------------------------------------------------------- latency


def test_latency_on_a_tiny_model():
    model = tiny_llama()
    result = metrics.latency(model, batch=2, prompt_len=8, new_tokens=5, repeats=3)
    assert result.step_context == [9, 10, 11, 12]
    assert len(result.step_latency_s) == 4 and all(t > 0 for t in result.step_latency_s)
    for spread in (result.prefill_tokens_per_s, result.time_to_first_token_s, result.decode_tokens_per_s):
        assert 0 < spread.min <= spread.median <= spread.max < math.inf
    assert result.memory_measure == "peak RSS"
    assert result.peak_memory_bytes.min > 10 * 2**20  # a python process with torch holds far more than 10 MiB


def test_greedy_decode_matches_generate():
    """A fixed prompt: the two loops run the same model through different float paths, and a random
    prompt now and then meets a near-tie between two tokens that they break differently."""
    model = tiny_llama()
    prompt = torch.randint(64, (2, 6), generator=torch.Generator().manual_seed(0))
    tokens, first, steps = metrics._greedy_decode(model, prompt, 7)
    reference = model.generate(prompt, max_new_tokens=7, min_new_tokens=7, do_sample=False)
    assert torch.equal(tokens, reference[:, 6:])
    assert first > 0 and len(steps) == 6


# ---------------------------------------------------------------- distances


def test_identical_distributions(rng):
    p = torch.randn(3, 4, 50, generator=rng)
    for fn in (metrics.total_variation, metrics.max_abs_diff, metrics.kl_divergence):
        out = fn(p, p.clone())
        assert out.shape == (3, 4)
        torch.testing.assert_close(out, torch.zeros(3, 4), atol=1e-6, rtol=0)
    assert metrics.argmax_mismatch(p, p.clone()) == 0.0


def test_disjoint_supports():
    inf = float("inf")
    p = torch.tensor([[0.0, 0.0, -inf, -inf], [0.0, -inf, -inf, -inf]])
    q = torch.tensor([[-inf, -inf, 0.0, 0.0], [-inf, 0.0, -inf, -inf]])
    torch.testing.assert_close(metrics.total_variation(p, q), torch.ones(2))
    torch.testing.assert_close(metrics.max_abs_diff(p, q), torch.tensor([0.5, 1.0]))
    assert torch.isinf(metrics.kl_divergence(p, q)).all()
    assert metrics.argmax_mismatch(p, q) == 100.0


def test_known_values():
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.25, 0.75]).log()
    assert metrics.kl_divergence(p, q).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-5)
    assert metrics.total_variation(p, q).item() == pytest.approx(0.25, rel=1e-5)
    assert metrics.max_abs_diff(p, q).item() == pytest.approx(0.25, rel=1e-5)
    p4 = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]]).log()
    q4 = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.5, 0.2, 0.2]]).log()
    torch.testing.assert_close(metrics.total_variation(p4, q4), torch.tensor([0.3, 0.3]))
    torch.testing.assert_close(metrics.max_abs_diff(p4, q4), torch.tensor([0.3, 0.3]))
    assert metrics.argmax_mismatch(p4, q4) == 50.0


def test_kl_matches_torch_distributions(rng):
    p, q = torch.randn(5, 30, generator=rng) * 3, torch.randn(5, 30, generator=rng) * 3
    ref = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=p), torch.distributions.Categorical(logits=q)
    )
    torch.testing.assert_close(metrics.kl_divergence(p, q), ref, rtol=1e-5, atol=1e-6)
    assert (metrics.max_abs_diff(p, q) <= metrics.total_variation(p, q) + 1e-6).all()


# ---------------------------------------------------------------- bits per byte and intervals


def test_bits_per_byte_of_a_byte_level_model_is_its_loss_in_bits(rng):
    model = tiny_llama()
    ids = torch.randint(64, (33,), generator=rng)
    result = metrics.perplexity(model, ids, window=33, stride=33)
    text = bytes(ids[1:].tolist())  # a byte-level model: one token per byte, the first is context
    bpb = metrics.bits_per_byte(result.nll * result.tokens, text)
    assert bpb == pytest.approx(result.nll / math.log(2), rel=1e-12)


def test_bits_per_byte_counts_utf8_bytes_not_characters():
    # the same code length over the same text: two tokenizations, one number
    text = "héllo wörld"  # 11 characters, 13 bytes
    assert len(text.encode()) == 13
    nll_sum = 13 * math.log(2) * 1.5
    assert metrics.bits_per_byte(nll_sum, text) == pytest.approx(1.5, rel=1e-12)
    assert metrics.bits_per_byte(nll_sum, text.encode()) == metrics.bits_per_byte(nll_sum, text)
    assert metrics.bits_per_byte(0.0, "a") == 0.0


def test_bad_bits_per_byte_input():
    with pytest.raises(ValueError, match="nll_sum must be >= 0"):
        metrics.bits_per_byte(-1.0, "abc")
    with pytest.raises(ValueError, match="text must hold at least one byte"):
        metrics.bits_per_byte(1.0, "")
    with pytest.raises(TypeError, match="text must be the scored text"):
        metrics.bits_per_byte(1.0, [1, 2])
    with pytest.raises(TypeError, match="nll_sum must be a number"):
        metrics.bits_per_byte("1", "abc")


# Student's t quantiles t_{p, df}, from printed tables (9 digits)
T_TABLE = [
    (0.975, 1, 12.7062047),
    (0.975, 2, 4.30265273),
    (0.975, 4, 2.77644511),
    (0.975, 9, 2.26215716),
    (0.975, 29, 2.04522964),
    (0.975, 100, 1.98397152),
    (0.95, 10, 1.81246112),
    (0.995, 5, 4.03214298),
    (0.9, 3, 1.63774435),
]


@pytest.mark.parametrize("p,df,expected", T_TABLE)
def test_t_quantile_matches_tables(p, df, expected):
    assert metrics.t_quantile(p, df) == pytest.approx(expected, rel=1e-8)
    assert metrics.t_quantile(1 - p, df) == pytest.approx(-expected, rel=1e-8)


@pytest.mark.parametrize("p", [0.5, 0.6, 0.8, 0.975, 0.999, 0.02])
def test_t_quantile_closed_forms(p):
    # df = 1 is the Cauchy distribution; df = 2 has a closed form too; a huge df is the normal
    assert metrics.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9, abs=1e-12)
    assert metrics.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9, abs=1e-12)
    normal = statistics.NormalDist().inv_cdf(p)
    assert metrics.t_quantile(p, 1e7) == pytest.approx(normal, rel=1e-6, abs=1e-9)


def test_mean_interval_by_hand():
    values = [1.0, 2.0, 4.0, 7.0]
    interval = metrics.mean_interval(values)
    half = 3.18244631 * statistics.stdev(values) / 2  # t_{0.975, 3} sd / sqrt(4)
    assert interval.n == 4 and interval.mean == 3.5
    assert interval.low == pytest.approx(3.5 - half, rel=1e-8)
    assert interval.high == pytest.approx(3.5 + half, rel=1e-8)
    tensor = metrics.mean_interval(torch.tensor(values), confidence=0.95)
    assert tensor == pytest.approx(interval)


def test_mean_interval_narrows_with_lower_confidence_and_more_values(rng):
    values = torch.randn(200, generator=rng, dtype=torch.float64)
    wide, narrow = metrics.mean_interval(values, 0.99), metrics.mean_interval(values, 0.8)
    assert narrow.low > wide.low and narrow.high < wide.high
    few = metrics.mean_interval(values[:10])
    assert few.high - few.low > (metrics.mean_interval(values).high - metrics.mean_interval(values).low) * 2
    assert metrics.mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0, 3)


def test_mean_interval_covers_the_mean_about_95_percent_of_the_time():
    gen = torch.Generator().manual_seed(0)
    trials = 2000
    samples = torch.randn(trials, 5, generator=gen, dtype=torch.float64) + 3.0
    covered = 0
    for row in samples:
        interval = metrics.mean_interval(row)
        covered += interval.low <= 3.0 <= interval.high
    assert 0.93 < covered / trials < 0.97  # binomial sd about 0.005


def test_bad_interval_input():
    with pytest.raises(ValueError, match="at least 2 numbers"):
        metrics.mean_interval([1.0])
    with pytest.raises(ValueError, match=r"values\[1\] must be a finite number"):
        metrics.mean_interval([1.0, float("nan")])
    with pytest.raises(TypeError, match="values must be a sequence"):
        metrics.mean_interval("12")
    with pytest.raises(ValueError, match=r"confidence must be in \(0"):
        metrics.mean_interval([1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError, match=r"p must be in \(0"):
        metrics.t_quantile(0.0, 3)
    with pytest.raises(ValueError, match="df must be > 0"):
        metrics.t_quantile(0.9, 0)


# ---------------------------------------------------------------- bad input


def test_bad_perplexity_input():
    model = ContextCounter(vocab=5)
    doc = torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="token_ids must hold at least one document"):
        metrics.perplexity(model, [], window=4, stride=4)
    with pytest.raises(ValueError, match=r"token_ids\[0\] must have at least 2 tokens"):
        metrics.perplexity(model, torch.zeros(0, dtype=torch.long), window=4, stride=4)
    with pytest.raises(ValueError, match=r"token_ids\[1\] must be a 1-D LongTensor"):
        metrics.perplexity(model, [doc, doc[None]], window=4, stride=4)
    with pytest.raises(ValueError, match=r"token_ids\[0\] must be a 1-D LongTensor"):
        metrics.perplexity(model, doc.float(), window=4, stride=4)
    with pytest.raises(ValueError, match="window must be >= 2"):
        metrics.perplexity(model, doc, window=1, stride=1)
    with pytest.raises(ValueError, match="stride must be between 1 and window=4"):
        metrics.perplexity(model, doc, window=4, stride=0)
    with pytest.raises(ValueError, match="stride must be between 1 and window=4"):
        metrics.perplexity(model, doc, window=4, stride=5)


def test_bad_per_position_and_length_input():
    model = ContextCounter(vocab=5)
    doc = torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="length must be >= 2"):
        metrics.per_position_loss(model, [doc], length=1)
    with pytest.raises(ValueError, match="documents must hold at least one document"):
        metrics.per_position_loss(model, [], length=4)
    with pytest.raises(ValueError, match=r"documents\[1\] must have at least length=8 tokens"):
        metrics.per_position_loss(model, [doc, doc[:5]], length=8)
    with pytest.raises(ValueError, match="train_window must be >= 2"):
        metrics.length_generalization(model, [doc], train_window=1)
    with pytest.raises(ValueError, match="n must be >= 2"):
        metrics.length_generalization(model, [doc], train_window=4, n=1)
    with pytest.raises(ValueError, match="ratios must be a non-empty list of positive numbers"):
        metrics.length_generalization(model, [doc], train_window=4, ratios=[0, 1])
    with pytest.raises(ValueError, match="documents are too short for every length"):
        metrics.length_generalization(model, [doc], train_window=20, ratios=[1, 2])


@pytest.mark.parametrize(
    "name,value",
    [("batch", 0), ("prompt_len", 0), ("new_tokens", 1), ("repeats", 0), ("warmup", -1), ("vocab_size", 0)],
)
def test_bad_latency_input(name, value):
    kwargs = dict(batch=1, prompt_len=4, new_tokens=3, repeats=1, vocab_size=64, warmup=0) | {name: value}
    with pytest.raises(ValueError, match=f"{name} must be >= "):
        metrics.latency(tiny_llama(), **kwargs)


def test_bad_distance_input():
    p = torch.zeros(3, 10)
    for fn in (metrics.total_variation, metrics.max_abs_diff, metrics.kl_divergence, metrics.argmax_mismatch):
        with pytest.raises(ValueError, match=r"q_logits must have the shape of p_logits \(3, 10\)"):
            fn(p, torch.zeros(3, 11))
        with pytest.raises(ValueError, match="p_logits must have shape"):
            fn(torch.tensor(0.0), torch.tensor(0.0))


@pytest.mark.parametrize("distance", ["total_variation", "max_abs_diff", "kl_divergence", "argmax_mismatch"])
@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.tensor([[0.0, 1.0], [-math.inf, -math.inf]]), r"at position \(1,\) is -inf for every token"),
        (torch.tensor([[0.0, math.nan], [0.0, 1.0]]), "holds NaN or \\+inf"),
        (torch.tensor([[0.0, math.inf], [0.0, 1.0]]), "holds NaN or \\+inf"),
    ],
    ids=["all_minus_inf", "nan", "plus_inf"],
)
def test_distances_refuse_logits_that_are_no_distribution(distance, bad, match):
    good = torch.zeros(2, 2)
    for p, q, name in ((bad, good, "p_logits"), (good, bad, "q_logits")):
        with pytest.raises(ValueError, match=f"{name} {match}"):
            getattr(metrics, distance)(p, q)


def test_argmax_mismatch_needs_a_position():
    with pytest.raises(ValueError, match="p_logits must hold at least one position, got shape \\(0, 5\\)"):
        metrics.argmax_mismatch(torch.zeros(0, 5), torch.zeros(0, 5))
    assert metrics.total_variation(torch.zeros(0, 5), torch.zeros(0, 5)).shape == (0,)
