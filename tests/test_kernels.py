"""The Triton kernels against the float64 reference ops, on a GPU when there is one, else in
Triton's interpreter on the CPU (shapes kept small: the interpreter runs each program in Python).

The interpreter computes tl.dot in float32 for every input dtype and truncates (rather than
rounds) when it casts to bfloat16, so its bfloat16 error (about 3e-3) sits above a GPU's.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is first imported
pytest.importorskip("triton", reason="the kernels need the triton package (pip install triton)")

from ttt_helpers import ops  # noqa: E402
from ttt_helpers.compat import output_cache  # noqa: E402
from ttt_helpers.kernels import (  # noqa: E402
    TTTLinearDecoder,
    ttt_linear_decode,
    ttt_linear_prefill,
    ttt_mlp_decode,
    ttt_mlp_prefill,
    use_kernels,
)
from ttt_helpers.layers import IMPLS, TTTLinear, pick_path  # noqa: E402
from ttt_helpers.testing import random_inputs, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3}


def make_inputs(B, H, T, D, dtype, gen, state_dtype=None):
    """Random inputs of `ops.ttt_linear` at the scales a trained layer sees (eta ~ base_lr / D)."""
    return random_inputs("linear", B, H, T, D, gen, dtype=dtype, state_dtype=state_dtype, device=DEVICE)


def reference(args: dict, mini_batch_size: int, **kw):
    """`ops.ttt_linear` in float64 on the same (already rounded) inputs."""
    return ops.ttt_linear(**{k: v.to(F64) for k, v in args.items()}, mini_batch_size=mini_batch_size, **kw)


@pytest.mark.parametrize(
    "B,H,T,D,b",
    [
        (2, 3, 37, 32, 16),  # T not a multiple of b: a partial last mini-batch
        (1, 2, 40, 64, 16),
        (1, 1, 21, 128, 16),
        (2, 2, 23, 32, 8),  # b < 16: padded inside to the 16-row tile
        (1, 2, 45, 16, 32),
        (1, 1, 5, 32, 16),  # fewer tokens than one mini-batch
    ],
)
@pytest.mark.parametrize("schedule", ["fused", "split"])
def test_prefill_fp32_matches_reference(B, H, T, D, b, schedule, rng):
    args = make_inputs(B, H, T, D, torch.float32, rng)
    Z, W, bias = ttt_linear_prefill(**args, mini_batch_size=b, schedule=schedule)
    for out, ref in zip((Z, W, bias), reference(args, b)):
        assert out.dtype == torch.float32
        assert rel_err(out, ref) < TOL[torch.float32]


def test_prefill_bad_schedule(rng):
    with pytest.raises(ValueError, match="schedule must be 'fused' or 'split'"):
        ttt_linear_prefill(**make_inputs(1, 1, 16, 16, torch.float32, rng), schedule="auto")


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32])
def test_prefill_bf16_matches_reference(state_dtype, rng):
    """bf16 inputs; the final state comes back in W0's dtype (float32 keeps it unrounded)."""
    args = make_inputs(2, 2, 50, 64, torch.bfloat16, rng, state_dtype=state_dtype)
    for schedule in ("fused", "split"):
        Z, W, bias = ttt_linear_prefill(**args, schedule=schedule)
        assert Z.dtype == torch.bfloat16 and W.dtype == bias.dtype == state_dtype
        for out, ref in zip((Z, W, bias), reference(args, 16)):
            assert rel_err(out, ref) < TOL[torch.bfloat16], schedule


def test_prefill_takes_layer_layouts_and_streams(rng):
    """Heads as a [B, T, H, D] view and W0 expanded over the batch, as the layers pass them;
    the output keeps that layout; two calls passing the state equal one call."""
    B, H, T, D, split = 2, 3, 41, 32, 32
    args = make_inputs(B, H, T, D, torch.float32, rng)
    for name in ("XQ", "XK", "XV"):
        args[name] = args[name].transpose(1, 2).contiguous().transpose(1, 2)
    args["W0"], args["b0"] = args["W0"][:1].expand(B, -1, -1, -1), args["b0"][:1].expand(B, -1, -1, -1)
    Z_ref, W_ref, b_ref = reference(args, 16)

    Z, W, bias = ttt_linear_prefill(**args)
    assert Z.stride() == args["XQ"].stride()
    first = {k: v[:, :, :split] if k in ("XQ", "XK", "XV", "eta") else v for k, v in args.items()}
    second = {k: v[:, :, split:] if k in ("XQ", "XK", "XV", "eta") else v for k, v in args.items()}
    Z1, W1, b1 = ttt_linear_prefill(**first)
    Z2, W2, b2 = ttt_linear_prefill(**{**second, "W0": W1, "b0": b1})
    for out, ref in ((Z, Z_ref), (W, W_ref), (bias, b_ref), (torch.cat([Z1, Z2], 2), Z_ref), (W2, W_ref), (b2, b_ref)):
        assert rel_err(out, ref) < TOL[torch.float32]


def test_prefill_custom_token_idx_and_eps(rng):
    args = make_inputs(1, 2, 29, 32, torch.float32, rng)
    token_idx = (torch.rand(16, generator=rng) + 0.1).to(DEVICE)
    Z, W, bias = ttt_linear_prefill(**args, token_idx=token_idx, eps=1e-3)
    for out, ref in zip((Z, W, bias), reference(args, 16, token_idx=token_idx.to(F64), eps=1e-3)):
        assert rel_err(out, ref) < TOL[torch.float32]


def decode_inputs(args: dict, t: int):
    return [args[k][:, :, t : t + 1] for k in ("XQ", "XK", "XV")] + [args["eta"][:, :, t]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_primal_form(dtype, rng):
    """Token by token across two commits and a partial mini-batch: outputs against the dual form
    in float64, the state (weights and gradient sums) against `ops.ttt_continue`."""
    B, H, T, D, b = 2, 2, 11, 32, 4
    args = make_inputs(B, H, T, D, dtype, rng, state_dtype=torch.float32)
    token_idx = ops.default_token_idx(b, device=DEVICE)
    state = (args["W0"].clone(), args["b0"].clone(), torch.zeros_like(args["W0"]), torch.zeros_like(args["b0"]))
    outputs = []
    for t in range(T):
        outputs.append(
            ttt_linear_decode(
                *decode_inputs(args, t), state, t % b, args["ln_weight"], args["ln_bias"], token_idx
            ).clone()
        )
    Z_ref, _, _ = reference(args, b)
    assert rel_err(torch.cat(outputs, 2), Z_ref) < TOL[dtype]

    assert_state_matches_continue("linear", args, ("W0", "b0"), state, b, token_idx, TOL[dtype])


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_decode_with_a_position_per_row_matches_the_reference(kind, index_dtype, rng):
    """Four rows in one launch at positions 3, 0, 1 and 3 of 4-token mini-batches, from a state
    inside its mini-batch (gradient sums not zero): z and the whole state against
    `ops.decode_step` in float64 with the same positions; rows 0 and 3 commit, rows 1 and 2 do not."""
    B, H, D, b = 4, 2, 16, 4
    make = make_inputs if kind == "linear" else make_mlp_inputs
    args = make(B, H, 1, D, torch.float32, rng)
    names = ("W0", "b0") if kind == "linear" else ("W1", "b1", "W2", "b2")
    params = tuple(args[k] for k in names)
    sums = tuple(torch.randn(p.shape, generator=rng).to(DEVICE) * 0.05 * p.std() for p in params)
    state = tuple(t.clone() for t in params + sums)
    position = torch.tensor([3, 0, 1, 3], dtype=index_dtype, device=DEVICE)
    token_idx = ops.default_token_idx(b, device=DEVICE)
    decode = ttt_linear_decode if kind == "linear" else ttt_mlp_decode
    z = decode(*decode_inputs(args, 0), state, position, args["ln_weight"], args["ln_bias"], token_idx)
    z_ref, state_ref = ops.decode_step(
        kind, *(x.to(F64) for x in decode_inputs(args, 0)), tuple(t.to(F64) for t in params + sums),
        position, args["ln_weight"].to(F64), args["ln_bias"].to(F64), token_idx.to(F64),
    )  # fmt: skip
    assert rel_err(z, z_ref) < TOL[torch.float32]
    for got, want in zip(state, state_ref, strict=True):
        assert rel_err(got, want) < TOL[torch.float32]
    for grad in state[len(params) :]:
        assert grad[[0, 3]].abs().max() == 0 and grad[1].abs().min() > 0 and grad[2].abs().max() > 0


def assert_state_matches_continue(kind, args, names, state, b, token_idx, tol):
    """A decoded state (params and gradient sums) against `ops.ttt_continue` over all of args' tokens."""
    a64 = {k: v.to(F64) for k, v in args.items()}
    params = tuple(a64[k] for k in names)
    _, state_ref, position = ops.ttt_continue(
        kind,
        *(a64[k] for k in ("XQ", "XK", "XV", "eta")),
        params + tuple(torch.zeros_like(p) for p in params),
        0,
        a64["ln_weight"],
        a64["ln_bias"],
        b,
        token_idx.to(F64),
    )
    assert position == args["XQ"].shape[2] % b
    for out, ref in zip(state, state_ref, strict=True):
        assert rel_err(out, ref) < tol


def test_decoder_matches_step_by_step_reference(rng):
    """`TTTLinearDecoder` (a CUDA graph on a GPU, eager here) against `ttt_linear_step` + `commit_state`,
    starting inside a mini-batch."""
    B, H, T, D, b, position = 2, 2, 7, 32, 4, 2
    args = make_inputs(B, H, T, D, torch.float32, rng)
    token_idx = ops.default_token_idx(b, device=DEVICE)
    grads = [(torch.randn(*shape, generator=rng) * 0.01).to(DEVICE) for shape in ((B, H, D, D), (B, H, 1, D))]
    state = (args["W0"].clone(), args["b0"].clone(), grads[0].clone(), grads[1].clone())
    ref_state = tuple(t.to(F64) for t in (args["W0"], args["b0"], *grads))
    decoder = TTTLinearDecoder(state, position, args["ln_weight"], args["ln_bias"], token_idx)
    for t in range(T):
        z = decoder.step(*decode_inputs(args, t))
        z_ref, ref_state = ops.ttt_linear_step(
            *(x.to(F64) for x in decode_inputs(args, t)),
            ref_state,
            position,
            args["ln_weight"].to(F64),
            args["ln_bias"].to(F64),
            token_idx.to(F64),
        )
        if position == b - 1:
            ref_state = ops.commit_state(ref_state, token_idx[position].to(F64))
        position = (position + 1) % b
        assert rel_err(z, z_ref) < TOL[torch.float32]
    assert int(decoder.position) == position
    for out, ref in zip(decoder.state, ref_state):
        assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_cuda_graph_decoder_equals_eager(rng):
    B, H, T, D, b = 4, 3, 20, 64, 16
    args = make_inputs(B, H, T, D, torch.bfloat16, rng, state_dtype=torch.float32)
    token_idx = ops.default_token_idx(b, device=DEVICE)
    states = [
        (args["W0"].clone(), args["b0"].clone(), torch.zeros_like(args["W0"]), torch.zeros_like(args["b0"]))
        for _ in range(2)
    ]
    graphed = TTTLinearDecoder(states[0], 0, args["ln_weight"], args["ln_bias"], token_idx)
    eager = TTTLinearDecoder(states[1], 0, args["ln_weight"], args["ln_bias"], token_idx, use_graph=False)
    for t in range(T):
        assert torch.equal(graphed.step(*decode_inputs(args, t)), eager.step(*decode_inputs(args, t)))
    assert graphed.graph is not None
    for a, b_ in zip(states[0], states[1]):
        assert torch.equal(a, b_)


def test_path_picker(rng):
    """`layers.pick_path`: "auto" runs the kernels on CUDA (the prefill, the training kernels when a
    gradient is needed) and the reference elsewhere; "kernel" and "reference" force one path; a
    layer's output through each path matches the reference's."""
    args = make_inputs(1, 2, 20, 32, torch.float32, rng)
    XQ = args["XQ"]
    assert use_kernels(XQ) == (DEVICE == "cuda")
    assert pick_path("reference", XQ, 16, ()) == "reference"
    assert pick_path("auto", XQ, 16, ()) == ("prefill" if DEVICE == "cuda" else "reference")
    assert pick_path("kernel", XQ, 16, ()) == "prefill"
    assert pick_path("kernel", XQ[:, :, :1], 16, (), stream=True) == "decode"
    assert pick_path("auto", XQ, 16, (), primal=True) == "primal"
    W0 = args["W0"].clone().requires_grad_(True)
    assert pick_path("kernel", XQ, 16, (W0,)) == "train"
    assert pick_path("auto", XQ, 16, (W0,)) == ("train" if DEVICE == "cuda" else "reference")
    with torch.no_grad():
        assert pick_path("kernel", XQ, 16, (W0,)) == "prefill"
    # the layer's outputs and gradients through each path
    x = torch.randn(1, 20, 64, generator=rng).to(DEVICE)
    layers = {impl: TTTLinear(64, 2, impl=impl).to(DEVICE) for impl in IMPLS}
    for layer in layers.values():
        layer.load_state_dict(layers["reference"].state_dict())
    outs = {impl: layer(x)[0] for impl, layer in layers.items()}
    grads = {impl: torch.autograd.grad(out.sum(), layers[impl].W0)[0] for impl, out in outs.items()}
    assert torch.equal(outs["auto"], outs["kernel"] if DEVICE == "cuda" else outs["reference"])
    assert rel_err(outs["kernel"], outs["reference"].to(F64)) < TOL[torch.float32]
    assert rel_err(grads["kernel"], grads["reference"].to(F64)) < TOL[torch.float32]
    with pytest.raises(ValueError, match="no backward"):
        ttt_linear_prefill(**args | {"W0": W0})
    with pytest.raises(ValueError, match="impl"):
        TTTLinear(64, 2, impl="fast")


def test_bad_inputs_raise_value_errors(rng):
    args = make_inputs(1, 2, 20, 32, torch.float32, rng)
    with pytest.raises(ValueError, match="head dim"):
        ttt_linear_prefill(**make_inputs(1, 1, 4, 24, torch.float32, rng))
    with pytest.raises(ValueError, match="mini_batch_size"):
        ttt_linear_prefill(**args, mini_batch_size=65)
    with pytest.raises(ValueError, match="eta must have shape"):
        ttt_linear_prefill(**{**args, "eta": args["eta"][:, :, :-1]})
    with pytest.raises(ValueError, match="XK must have dtype"):
        ttt_linear_prefill(**{**args, "XK": args["XK"].bfloat16()})
    with pytest.raises(ValueError, match="XQ must be float16, bfloat16 or float32"):
        ttt_linear_prefill(**{k: v.double() for k, v in args.items()})
    token_idx = ops.default_token_idx(16, device=DEVICE)
    rest = (args["b0"], torch.zeros_like(args["W0"]), torch.zeros_like(args["b0"]))
    step, ln = decode_inputs(args, 0), (args["ln_weight"], args["ln_bias"])
    with pytest.raises(ValueError, match="contiguous"):
        ttt_linear_decode(*step, (args["W0"].transpose(-1, -2), *rest), 0, *ln, token_idx)
    with pytest.raises(ValueError, match="position"):
        ttt_linear_decode(*step, (args["W0"], *rest), 16, *ln, token_idx)
    if DEVICE == "cpu":
        os.environ.pop("TRITON_INTERPRET")
        try:
            with pytest.raises(ValueError, match="CUDA device"):
                ttt_linear_prefill(**args)
        finally:
            os.environ["TRITON_INTERPRET"] = "1"


# ---------------------------------------------------------------- the model's dispatch (TTTConfig.ttt_impl)


def tiny_model(impl: str, layer_type: str = "linear", backbone: str = "transformer", **options):
    from ttt_helpers.model import TTTConfig, TTTForCausalLM

    torch.manual_seed(0)
    config = TTTConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        ttt_layer_type=layer_type,
        backbone=backbone,
        ttt_impl=impl,
        **options,
    )
    return TTTForCausalLM(config).to(DEVICE).eval()


@pytest.mark.parametrize(
    "layer_type,backbone", [("linear", "transformer"), ("linear", "mamba"), ("mlp", "transformer"), ("mlp", "mamba")]
)
def test_model_kernel_path_matches_reference(layer_type, backbone, rng):
    """Forced kernels against the reference ops on one model: one forward over T = 37 tokens, and a
    prefill of 21 tokens (one whole mini-batch, then a ragged end) followed by token-by-token decode."""
    ids = torch.randint(0, 64, (2, 37), generator=rng).to(DEVICE)
    kernel = tiny_model("kernel", layer_type, backbone)
    reference = tiny_model("reference", layer_type, backbone)
    reference.load_state_dict(kernel.state_dict())
    with torch.no_grad():
        want = reference(ids).logits
        assert (kernel(ids).logits - want).abs().max().item() < 1e-4
        out = kernel(ids[:, :21], use_cache=True)
        pieces, cache = [out.logits], output_cache(out)
        for t in range(21, 37):
            out = kernel(ids[:, t : t + 1], cache=cache, use_cache=True)
            pieces.append(out.logits)
    assert (torch.cat(pieces, dim=1) - want).abs().max().item() < 1e-4


def test_model_dispatch_choices(monkeypatch):
    """'auto' runs the kernels only on CUDA: the prefill without gradients, the training kernels
    with them; the reference op never calls either."""
    from ttt_helpers import kernels

    calls = []
    for name in ("ttt_linear_prefill", "ttt_linear_train"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    ids = torch.randint(0, 64, (1, 32), device=DEVICE)
    with torch.no_grad():
        tiny_model("reference")(ids)
        assert calls == []
        tiny_model("auto")(ids)
        assert calls == (["ttt_linear_prefill"] * 2 if DEVICE == "cuda" else [])
    calls.clear()
    tiny_model("auto").train()(ids, labels=ids).loss.backward()
    assert calls == (["ttt_linear_train"] * 2 if DEVICE == "cuda" else [])


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_compiled_blocks_decode_as_eager(layer_type, rng):
    """Blocks under torch.compile (dynamo's eager backend) run the kernels' launches outside the
    compiled code, prefill and decode alike, and give the eager model's logits."""
    import copy

    model = tiny_model("kernel", layer_type, "mamba")
    compiled = copy.deepcopy(model)
    for block in compiled.model.layers:
        block.compile(backend="eager")
    ids = torch.randint(0, 64, (2, 24), generator=rng).to(DEVICE)
    with torch.no_grad():
        want, got = (m(ids[:, :18], use_cache=True) for m in (model, compiled))
        assert (want.logits - got.logits).abs().max().item() < 1e-6
        caches = output_cache(want), output_cache(got)
        for t in range(18, 24):
            a, b = (m(ids[:, t : t + 1], cache=c, use_cache=True).logits for m, c in zip((model, compiled), caches))
            assert (a - b).abs().max().item() < 1e-6, f"token {t}"


def test_left_padded_batch_through_the_kernels_matches_each_row_alone(rng):
    """A left-padded batch runs its groups of rows through the kernels as each row alone would."""
    model = tiny_model("kernel", "linear", "mamba")
    model.generation_config.eos_token_id = None  # every row generates all its tokens
    lengths = (20, 3, 9)
    rows = [torch.randint(1, 64, (1, n), generator=rng).to(DEVICE) for n in lengths]
    ids = torch.zeros(3, 20, dtype=torch.long, device=DEVICE)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, 20 - row.shape[1] :], mask[i, 20 - row.shape[1] :] = row[0], 1
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    batch = model.generate(ids, attention_mask=mask, **kw)
    for i, row in enumerate(rows):
        alone = model.generate(row, attention_mask=torch.ones_like(row), **kw)
        assert torch.equal(batch.sequences[i, 20:], alone.sequences[0, row.shape[1] :]), f"row {i}"
        assert max((a[i] - b[0]).abs().max().item() for a, b in zip(batch.logits, alone.logits)) < 1e-4


def test_model_dispatch_bad_input():
    from ttt_helpers.model import TTTConfig

    with pytest.raises(ValueError, match="ttt_impl"):
        TTTConfig(ttt_impl="fast")


def test_set_ttt_impl_switches_every_layer():
    model = tiny_model("auto")
    model.set_ttt_impl("reference")
    assert model.config.ttt_impl == "reference" and all(b.ttt.impl == "reference" for b in model.model.layers)
    with pytest.raises(ValueError, match="impl must be one of"):
        model.set_ttt_impl("fast")
    mlp = tiny_model("auto", layer_type="mlp")
    mlp.set_ttt_impl("kernel")
    assert all(b.ttt.impl == "kernel" for b in mlp.model.layers)


# ---------------------------------------------------------------- TTT-MLP


def make_mlp_inputs(B, H, T, D, dtype, gen, F=None, state_dtype=None):
    """Random inputs of `ops.ttt_mlp` (hidden width F, 4D by default) at a layer's scales."""
    return random_inputs("mlp", B, H, T, D, gen, F=F, dtype=dtype, state_dtype=state_dtype, device=DEVICE)


def mlp_reference(args: dict, mini_batch_size: int = 16):
    return ops.ttt_mlp(**{k: v.to(F64) for k, v in args.items()}, mini_batch_size=mini_batch_size)


def assert_mlp_close(outs, refs, args, tol):
    """Z and the final state against the reference; the state's change too, so a wrong update
    cannot hide under the unchanged part of the weights."""
    assert rel_err(outs[0], refs[0]) < tol
    for name, out, ref in zip(("W1", "b1", "W2", "b2"), outs[1:], refs[1:]):
        start = args[name].to(F64)
        assert (ref - start).norm() > 1e-3 * start.norm(), f"{name} barely moves: the check would be weak"
        assert rel_err(out, ref) < tol and rel_err(out.double() - start, ref - start) < 20 * tol, name


@pytest.mark.parametrize(
    "B,H,T,D,b,F",
    [
        (2, 2, 37, 16, 16, None),  # a partial last mini-batch
        (1, 2, 21, 32, 8, None),  # b < 16: padded to the 16-row tile
        (1, 1, 19, 64, 16, 48),  # F a multiple of 16, not of 32: chunks of 16
        (1, 1, 9, 128, 16, None),  # fewer tokens than one mini-batch
    ],
)
def test_mlp_prefill_fp32_matches_reference(B, H, T, D, b, F, rng):
    args = make_mlp_inputs(B, H, T, D, torch.float32, rng, F=F)
    before = {k: v.clone() for k, v in args.items()}
    outs = ttt_mlp_prefill(**args, mini_batch_size=b)
    assert_mlp_close(outs, mlp_reference(args, b), args, TOL[torch.float32])
    assert all(torch.equal(args[k], before[k]) for k in args)  # the caller's state is never written


def test_mlp_prefill_bf16_streams_and_takes_layer_layouts(rng):
    """bf16 inputs as a [B, T, H, D] view, the state expanded over the batch and kept in float32;
    two calls passing the state equal one call."""
    B, H, T, D, split = 2, 2, 45, 32, 32
    args = make_mlp_inputs(B, H, T, D, torch.bfloat16, rng, state_dtype=torch.float32)
    for name in ("XQ", "XK", "XV"):
        args[name] = args[name].transpose(1, 2).contiguous().transpose(1, 2)
    for name in ("W1", "b1", "W2", "b2"):
        args[name] = args[name][:1].expand(B, -1, -1, -1)
    refs = mlp_reference(args)
    outs = ttt_mlp_prefill(**args)
    assert outs[0].dtype == torch.bfloat16 and outs[0].stride() == args["XQ"].stride()
    assert all(o.dtype == torch.float32 for o in outs[1:])
    assert_mlp_close(outs, refs, args, TOL[torch.bfloat16])
    seq = ("XQ", "XK", "XV", "eta")
    Z1, *state = ttt_mlp_prefill(**{k: v[:, :, :split] if k in seq else v for k, v in args.items()})
    second = {k: v[:, :, split:] if k in seq else v for k, v in args.items()}
    Z2, *state = ttt_mlp_prefill(**{**second, **dict(zip(("W1", "b1", "W2", "b2"), state))})
    assert_mlp_close((torch.cat([Z1, Z2], 2), *state), refs, args, TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_decode_matches_primal_form(dtype, rng):
    """Token by token across two commits and a partial mini-batch: outputs against the dual form
    in float64, the state (weights and gradient sums) against `ops.ttt_continue`."""
    B, H, T, D, b = 2, 2, 11, 16, 4
    args = make_mlp_inputs(B, H, T, D, dtype, rng, state_dtype=torch.float32)
    token_idx = ops.default_token_idx(b, device=DEVICE)
    params = tuple(args[k].clone() for k in ("W1", "b1", "W2", "b2"))
    state = params + tuple(torch.zeros_like(p) for p in params)
    outputs = [
        ttt_mlp_decode(*decode_inputs(args, t), state, t % b, args["ln_weight"], args["ln_bias"], token_idx).clone()
        for t in range(T)
    ]
    assert rel_err(torch.cat(outputs, 2), mlp_reference(args, b)[0]) < TOL[dtype]
    assert_state_matches_continue("mlp", args, ("W1", "b1", "W2", "b2"), state, b, token_idx, TOL[dtype])


def test_mlp_bad_inputs_raise_value_errors(rng):
    args = make_mlp_inputs(1, 2, 20, 16, torch.float32, rng)
    with pytest.raises(ValueError, match="hidden width F"):
        ttt_mlp_prefill(**make_mlp_inputs(1, 1, 4, 16, torch.float32, rng, F=40))
    with pytest.raises(ValueError, match="W2 must have shape"):
        ttt_mlp_prefill(**{**args, "W2": args["W2"][:, :, :-16]})
    with pytest.raises(ValueError, match="XV must have dtype"):
        ttt_mlp_prefill(**{**args, "XV": args["XV"].bfloat16()})
    params = tuple(args[k] for k in ("W1", "b1", "W2", "b2"))
    state = params + tuple(torch.zeros_like(p) for p in params)
    step, ln = decode_inputs(args, 0), (args["ln_weight"], args["ln_bias"])
    token_idx = ops.default_token_idx(16, device=DEVICE)
    with pytest.raises(ValueError, match="state must be a tuple"):
        ttt_mlp_decode(*step, state[:4], 0, *ln, token_idx)
    with pytest.raises(ValueError, match=r"state\[6\] \(grad_W2\) must be contiguous"):
        ttt_mlp_decode(*step, (*state[:6], state[6].transpose(-1, -2).contiguous().transpose(-1, -2), state[7]), 0,
                       *ln, token_idx)  # fmt: skip
    with pytest.raises(ValueError, match="no backward"):
        ttt_mlp_prefill(**{**args, "W1": args["W1"].clone().requires_grad_(True)})
