"""A whole model's decode steps and prefills replayed from CUDA graphs, against the eager model.

Capturing needs a GPU; the checks of bad input run on the CPU too (through Triton's interpreter).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is first imported
pytest.importorskip("triton", reason="the kernels need the triton package (pip install triton)")

from test_kernels import tiny_model  # noqa: E402  (the same tiny model as the dispatch tests)

from ttt_helpers.compat import output_cache  # noqa: E402
from ttt_helpers.inference.cuda_graphs import CUDAGraphDecoder, CUDAGraphPrefill  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize(
    "impl,layer_type,backbone,window",
    [("kernel", "linear", "transformer", 0), ("auto", "linear", "transformer", 0), ("auto", "mlp", "transformer", 0)]
    + [("auto", "linear", "mamba", 0), ("auto", "mlp", "mamba", 0), ("auto", "linear", "transformer", 8)],
)
def test_cuda_graph_decoder_matches_eager_decode(impl, layer_type, backbone, window, rng):
    """Graph replay against eager single-token forwards and one full forward, over 39 tokens after a
    prefill of 21 (mini-batch boundaries crossed twice, one graph for every position); with the
    Mamba backbone the replay also carries the convolution states, with hybrid layers (window 8,
    2 sinks) the attention's cache and the token count on the device."""
    model = tiny_model(impl, layer_type, backbone, attention_window=window, attention_sinks=2 if window else 0)
    ids = torch.randint(0, 64, (3, 60), generator=rng).to(DEVICE)
    with torch.no_grad():
        whole = model(ids).logits
        eager_cache = output_cache(model(ids[:, :21], use_cache=True))
        decoder = CUDAGraphDecoder(model, output_cache(model(ids[:, :21], use_cache=True)))
        for t in range(21, 60):
            eager = model(ids[:, t : t + 1], cache=eager_cache, use_cache=True).logits
            graph = decoder.step(ids[:, t : t + 1])
            assert (graph - eager).abs().max().item() < 1e-5, f"token {t}"
            assert (graph[:, 0] - whole[:, t]).abs().max().item() < 1e-4, f"token {t}"
    assert decoder.cache.seen_tokens == 60 and decoder.cache.positions.tolist() == [60 % 16] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("layer_type,backbone", [("linear", "transformer"), ("linear", "mamba"), ("mlp", "mamba")])
def test_cuda_graph_decoder_decodes_a_left_padded_batch_as_each_row_alone(layer_type, backbone, rng):
    """Prompts of 37, 6, 23 and 16 tokens (mini-batch positions 5, 6, 7 and 0) left-padded in one
    batch, then 30 teacher-forced tokens from one graph, with a 3-token call through the model in
    between (the decoder copies what it replaced back): every logit as the row alone, eager."""
    model = tiny_model("auto", layer_type, backbone)
    rows = [torch.randint(1, 64, (1, n), generator=rng).to(DEVICE) for n in (37, 6, 23, 16)]
    ids = torch.zeros(4, 37, dtype=torch.long, device=DEVICE)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, 37 - row.shape[1] :], mask[i, 37 - row.shape[1] :] = row[0], 1
    nxt = torch.randint(1, 64, (4, 33), generator=rng).to(DEVICE)
    with torch.no_grad():
        decoder = CUDAGraphDecoder(model, output_cache(model(ids, attention_mask=mask, use_cache=True)))
        alone = [output_cache(model(row, use_cache=True)) for row in rows]
        for t in range(33):
            if t == 15:  # three tokens at once, through the model's forward
                full = torch.cat([mask, torch.ones_like(nxt[:, : t + 3])], 1)
                got = model(nxt[:, t : t + 3], attention_mask=full, cache=decoder.cache).logits
            elif 15 < t < 18:
                continue
            else:
                got = decoder.step(nxt[:, t : t + 1])
            for i, cache in enumerate(alone):
                want = model(nxt[i : i + 1, t : t + got.shape[1]], cache=cache).logits
                assert (got[i] - want[0]).abs().max().item() < 1e-5, f"token {t}, row {i}"
    assert decoder.cache.positions.tolist() == [(n + 33) % 16 for n in (37, 6, 23, 16)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("fuse", [True, False])
def test_cuda_graph_decoder_reads_weights_changed_in_place(fuse, rng):
    """Weights changed in place between steps (an optimiser step, say) reach the replayed step:
    with fused projections through their refreshed copies, without through the model's own."""
    model = tiny_model("auto", "linear", "mamba")
    ids = torch.randint(0, 64, (2, 30), generator=rng).to(DEVICE)
    with torch.no_grad():
        eager_cache = output_cache(model(ids[:, :17], use_cache=True))
        decoder = CUDAGraphDecoder(model, output_cache(model(ids[:, :17], use_cache=True)), fuse=fuse)
        for t in range(17, 30):
            if t == 22:
                for block in model.model.layers:
                    for p in (block.ttt.v_proj.weight, block.ttt.lr_gate.bias, block.mlp.gate_proj.weight):
                        p.add_(0.05 * torch.randn(p.shape, generator=rng).to(p))
            eager = model(ids[:, t : t + 1], cache=eager_cache, use_cache=True).logits
            assert (decoder.step(ids[:, t : t + 1]) - eager).abs().max().item() < 1e-5, f"token {t}"


def test_cuda_graph_decoder_bad_input():
    model = tiny_model("reference")
    cache = model.model.new_cache(1)
    with pytest.raises(ValueError, match="ttt_impl='reference'"):
        CUDAGraphDecoder(model, cache)
    with pytest.raises(ValueError, match="must be a TTTForCausalLM"):
        CUDAGraphDecoder(torch.nn.Linear(2, 2), cache)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="CUDA device"):
            CUDAGraphDecoder(tiny_model("auto"), cache)
    else:
        with pytest.raises(TypeError, match="fuse must be True or False"):
            CUDAGraphDecoder(tiny_model("auto"), cache, fuse=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("layer_type,backbone", [("linear", "transformer"), ("linear", "mamba"), ("mlp", "mamba")])
def test_cuda_graph_prefill_matches_eager(layer_type, backbone, rng):
    """Replayed prefills against the eager forward at two shapes (one replayed twice with new ids):
    the same last-token logits, and a cache that decodes as the eager one does."""
    model = tiny_model("auto", layer_type, backbone)
    prefill = CUDAGraphPrefill(model)
    with torch.no_grad():
        for B, T in ((2, 37), (1, 16), (2, 37)):
            ids = torch.randint(0, 64, (B, T + 5), generator=rng).to(DEVICE)
            logits, cache = prefill(ids[:, :T])
            eager = model(ids[:, :T], use_cache=True)
            assert (logits - eager.logits[:, -1:]).abs().max().item() < 1e-5
            assert cache.seen_tokens == T
            eager_cache = output_cache(eager)
            decoder = CUDAGraphDecoder(model, cache)
            for t in range(T, T + 5):
                want = model(ids[:, t : t + 1], cache=eager_cache, use_cache=True).logits
                assert (decoder.step(ids[:, t : t + 1]) - want).abs().max().item() < 1e-5, f"token {t}"
            no_cache, none = prefill(ids[:, :T], use_cache=False)
            assert none is None and (no_cache - eager.logits[:, -1:]).abs().max().item() < 1e-5
    assert len(prefill.captured) == 4  # (2, 37) and (1, 16), each with and without a cache


def test_cuda_graph_prefill_bad_input():
    with pytest.raises(ValueError, match="ttt_impl='reference'"):
        CUDAGraphPrefill(tiny_model("reference"))
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="CUDA device"):
            CUDAGraphPrefill(tiny_model("auto"))
    else:
        prefill = CUDAGraphPrefill(tiny_model("auto"))
        with pytest.raises(ValueError, match="input_ids"):
            prefill(torch.full((1, 4), 64, device=DEVICE))  # outside the vocabulary
        with pytest.raises(ValueError, match="device"):
            prefill(torch.zeros(1, 4, dtype=torch.long))
