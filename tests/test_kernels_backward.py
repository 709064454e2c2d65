"""The Triton training kernels (forward + backward) against autograd through the reference ops.

On the CPU they run in Triton's interpreter in float64, where every gradient must match the
reference's to 1e-8 relative: the kernels compute the same math in float64 there, so anything
above rounding is a wrong term. On a GPU the float32 and bfloat16 paths are checked instead,
on few shapes (each compiles its own programs), so the GPU run takes well under a minute.
Each test draws fresh random inputs; the seed is in every assertion message to replay a failure.
"""

import os
from functools import partial

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is first imported
pytest.importorskip("triton", reason="the kernels need the triton package (pip install triton)")

from ttt_helpers import ops  # noqa: E402
from ttt_helpers.kernels import ttt_linear_train, ttt_mlp_train  # noqa: E402
from ttt_helpers.kernels.common import training_schedule  # noqa: E402
from ttt_helpers.layers import TTTMLP, TTTLinear  # noqa: E402
from ttt_helpers.testing import random_inputs, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
EXACT = 1e-8  # float64 kernels against the float64 reference
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # GPU kernels against the float64 reference
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="float32 / bfloat16 kernels need a GPU")
# On a GPU every float64 shape compiles its own float64 programs (slow to build, and not what
# training runs); there the float32 and bfloat16 tests below check the same code paths.
interpreter_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="float64 exactness checks run in the interpreter (CI); GPUs check fp32/bf16"
)

KINDS = {  # TTT-Linear under both schedules of its kernels (auto picks one by B * H on a GPU)
    "linear": (partial(ttt_linear_train, schedule="split"), ops.ttt_linear, ("W0", "b0")),
    "linear-fused": (partial(ttt_linear_train, schedule="fused"), ops.ttt_linear, ("W0", "b0")),
    "mlp": (ttt_mlp_train, ops.ttt_mlp, ("W1", "b1", "W2", "b2")),
}


def make_inputs(kind, B, H, T, D, b, gen, dtype=F64, F=None):
    """Inputs of the op at the scales a trained layer sees, with a non-zero initial state and a
    random token_idx (a learned offset moves it off 1/(1..b)); float64 leaves, rounded to dtype."""
    args = random_inputs(kind, B, H, T, D, gen, F=F)
    args["token_idx"] = ops.default_token_idx(b, dtype=F64) + 0.1 * torch.rand(b, generator=gen, dtype=F64)
    return {k: v.to(dtype).to(DEVICE) for k, v in args.items()}


def grads(op, args: dict, cotangents: list, b: int) -> tuple[tuple, dict]:
    """Outputs of op and the gradients of sum(outputs * cotangents) w.r.t. every argument."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in args.items()}
    outs = op(**leaves, mini_batch_size=b)
    got = torch.autograd.grad(outs, list(leaves.values()), [c.to(o.dtype) for c, o in zip(cotangents, outs)])
    return outs, dict(zip(leaves, got))


def compare(kind: str, args: dict, b: int, gen: torch.Generator, tol: float, seed: int) -> None:
    """Kernel outputs and the gradient of every argument against autograd through the float64
    reference on the same inputs, with random cotangents on Z and on every final-state tensor."""
    train, reference, _ = KINDS[kind]
    ref_args = {k: v.double() for k, v in args.items()}
    with torch.no_grad():
        shapes = [o.shape for o in reference(**ref_args, mini_batch_size=b)]
    cotangents = [torch.randn(s, generator=gen, dtype=F64).to(DEVICE) for s in shapes]
    ref_outs, ref_grads = grads(reference, ref_args, cotangents, b)
    outs, got = grads(train, args, cotangents, b)
    for i, (out, ref) in enumerate(zip(outs, ref_outs)):
        assert rel_err(out, ref) < tol, f"output {i}: {rel_err(out, ref):.2e} (seed {seed})"
    for name, ref in ref_grads.items():
        assert got[name].dtype == args[name].dtype and got[name].shape == ref.shape, name
        assert rel_err(got[name], ref) < tol, f"d {name}: {rel_err(got[name], ref):.2e} (seed {seed})"


# ---------------------------------------------------------------- float64, the interpreter in CI


@interpreter_only
@pytest.mark.parametrize("kind", ["linear", "linear-fused", "mlp"])
@pytest.mark.parametrize(
    "B,H,T,b",
    [
        (1, 2, 1, 16),  # one token
        (2, 1, 15, 16),  # one partial mini-batch
        (1, 2, 16, 16),  # exactly one
        (2, 2, 33, 16),  # a partial last one after two whole ones
        (1, 1, 80, 16),  # five: the adjoint of the state crosses four boundaries
        (1, 2, 37, 8),  # b < 16, padded inside to the 16-row tile
    ],
)
def test_gradients_match_reference_float64(kind, B, H, T, b, rng):
    seed = rng.initial_seed()
    data_kind = kind.split("-")[0]
    compare(kind, make_inputs(data_kind, B, H, T, 16, b, rng), b, rng, EXACT, seed)


@interpreter_only
def test_mlp_other_hidden_width_and_head_dim(rng):
    """F = 48 (chunks of 16 of the hidden width) and D = 32 against the reference."""
    seed = rng.initial_seed()
    compare("mlp", make_inputs("mlp", 1, 1, 20, 32, 16, rng, F=48), 16, rng, EXACT, seed)


@interpreter_only
@pytest.mark.parametrize("kind", ["linear", "linear-fused", "mlp"])
def test_gradcheck(kind, rng):
    """torch.autograd.gradcheck (finite differences) on a tiny case, every input and output."""
    train, _, names = KINDS[kind]
    args = make_inputs(kind.split("-")[0], 1, 1, 5, 16, 4, rng)
    order = ["XQ", "XK", "XV", "eta", *names, "ln_weight", "ln_bias"]
    inputs = tuple(args[k].requires_grad_(True) for k in order) + (4, args["token_idx"].requires_grad_(True))
    assert torch.autograd.gradcheck(train, inputs, fast_mode=True), f"seed {rng.initial_seed()}"


@interpreter_only
@pytest.mark.parametrize("layer_cls", [TTTLinear, TTTMLP])
def test_layer_trains_through_kernels(layer_cls, rng):
    """A layer with impl='kernel' under autograd against the same layer on the reference: the
    gradient of every parameter and of the input. The token_idx offset pushes some positions
    below zero, where the layer's clamp cuts their gradient; the rest reach the kernels' d token_idx."""
    seed = rng.initial_seed()
    torch.manual_seed(seed)
    kernel = layer_cls(32, 2, mini_batch_size=16, impl="kernel").double().to(DEVICE)
    reference = layer_cls(32, 2, mini_batch_size=16, impl="reference").double().to(DEVICE)
    with torch.no_grad():
        kernel.token_idx_offset.copy_(torch.randn(16, generator=rng, dtype=F64) * 0.5)
        kernel.token_idx_offset[:3] = -2.0  # clamped to 0 whatever the rest draws
        for p in kernel.initial_params():
            p.add_(torch.randn(p.shape, generator=rng, dtype=F64).to(DEVICE) * 0.05)
    reference.load_state_dict(kernel.state_dict())
    assert (kernel.token_idx() == 0).any() and (kernel.token_idx() > 0).any()
    x = torch.randn(2, 37, 32, generator=rng, dtype=F64).to(DEVICE)
    target = torch.randn(2, 37, 32, generator=rng, dtype=F64).to(DEVICE)
    results = []
    for layer in (kernel, reference):
        xi = x.clone().requires_grad_(True)
        y, state = layer(xi)
        loss = (y * target).sum() + sum((s * s).sum() for s in state)  # the final state is used too
        loss.backward()
        results.append({"x": xi.grad, **{n: p.grad for n, p in layer.named_parameters()}})
    got, want = results
    for name, ref in want.items():
        assert rel_err(got[name], ref) < EXACT, f"d {name}: {rel_err(got[name], ref):.2e} (seed {seed})"
    assert kernel.token_idx_offset.grad[:3].abs().max() == 0


@interpreter_only
def test_streamed_segments_match_one_call(rng):
    """Two calls passing the final state on (the first segment's state gets its gradient from the
    second) give the same gradients as one call over the whole sequence."""
    seed = rng.initial_seed()
    args = make_inputs("linear", 1, 2, 40, 16, 16, rng)
    leaves = {k: v.requires_grad_(True) for k, v in args.items()}
    Z, W, bias = ttt_linear_train(**leaves)
    (Z.square().sum() + W.sum() + bias.sum()).backward()
    whole = {k: v.grad.clone() for k, v in leaves.items()}
    for v in leaves.values():
        v.grad = None
    seq = ("XQ", "XK", "XV", "eta")
    Z1, W1, b1 = ttt_linear_train(**{k: v[:, :, :32] if k in seq else v for k, v in leaves.items()})
    second = {k: v[:, :, 32:] if k in seq else v for k, v in leaves.items()}
    Z2, W2, b2 = ttt_linear_train(**{**second, "W0": W1, "b0": b1})
    (Z1.square().sum() + Z2.square().sum() + W2.sum() + b2.sum()).backward()
    for name, ref in whole.items():
        assert rel_err(leaves[name].grad, ref) < EXACT, f"d {name} (seed {seed})"


def test_bad_inputs_raise_value_errors(rng):
    lin = make_inputs("linear", 1, 2, 20, 16, 16, rng)
    mlp = make_inputs("mlp", 1, 2, 20, 16, 16, rng)
    with pytest.raises(ValueError, match="head dim"):
        ttt_linear_train(**make_inputs("linear", 1, 1, 4, 24, 16, rng))
    with pytest.raises(ValueError, match="mini_batch_size"):
        ttt_linear_train(**{**lin, "token_idx": None}, mini_batch_size=65)
    with pytest.raises(ValueError, match="XK must have shape"):
        ttt_linear_train(**{**lin, "XK": lin["XK"][:, :, :10]})
    with pytest.raises(ValueError, match="eta must have shape"):
        ttt_linear_train(**{**lin, "eta": lin["eta"][..., None]})
    with pytest.raises(ValueError, match="token_idx must have shape"):
        ttt_linear_train(**lin, mini_batch_size=8)
    with pytest.raises(ValueError, match="b0 must have shape"):
        ttt_linear_train(**{**lin, "b0": lin["b0"][:, :, 0]})
    with pytest.raises(ValueError, match="XV must have dtype"):
        ttt_linear_train(**{**lin, "XV": lin["XV"].float()})
    with pytest.raises(ValueError, match="ln_weight must be float16, bfloat16, float32 or float64"):
        ttt_linear_train(**{**lin, "ln_weight": lin["ln_weight"].int()})
    with pytest.raises(ValueError, match="XQ must be a 4-D tensor"):
        ttt_linear_train(**{**lin, "XQ": lin["XQ"][0]})
    with pytest.raises(ValueError, match="W2 must have shape"):
        ttt_mlp_train(**{**mlp, "W2": mlp["W2"].transpose(-1, -2)})
    with pytest.raises(ValueError, match="multiple of 16"):
        ttt_mlp_train(**make_inputs("mlp", 1, 1, 4, 16, 16, rng, F=40))
    with pytest.raises(ValueError, match="schedule must be one of"):
        ttt_linear_train(**lin, schedule="parallel")


def test_fused_schedule_refused_where_it_does_not_fit(rng, monkeypatch):
    """As on a GPU (the interpreter has no shared-memory limit): float32 at D = 128 refuses the
    fused schedule before any launch, and auto picks split for it and for CPU tensors."""
    from ttt_helpers.kernels import common

    monkeypatch.setattr(common, "interpreting", lambda: False)
    XQ = torch.zeros(1, 1, 4, 128)
    with pytest.raises(ValueError, match="schedule='fused' does not fit in shared memory at head dim 128"):
        training_schedule("fused", XQ)
    assert training_schedule("auto", XQ) == "split"
    assert training_schedule("fused", XQ.bfloat16()) == "fused"
    assert training_schedule("auto", torch.zeros(64, 12, 4, 64)) == "split"  # not on a GPU


@needs_cuda
def test_gpu_fused_schedule_refused_where_it_does_not_fit(rng):
    """float32 inputs at D = 128: the fused backward needs more shared memory than a GPU has, so
    asking for it is an error naming the argument, and auto runs the split schedule."""
    args = make_inputs("linear", 8, 16, 40, 128, 16, rng, dtype=torch.float32)
    with pytest.raises(ValueError, match="schedule='fused' does not fit"):
        ttt_linear_train(**args, schedule="fused")
    assert training_schedule("auto", args["XQ"]) == "split"
    assert training_schedule("auto", args["XQ"].bfloat16()) == "fused"  # B * H = 128 chains


# ---------------------------------------------------------------- float32 and bfloat16 on a GPU


@needs_cuda
@pytest.mark.parametrize(
    "kind,dtype,D",
    [
        ("linear", torch.float32, 32),
        ("linear", torch.float32, 128),  # the largest state: shared memory and registers
        ("linear", torch.bfloat16, 64),
        ("linear", torch.bfloat16, 128),
        ("linear-fused", torch.float32, 64),
        ("linear-fused", torch.bfloat16, 128),
        ("mlp", torch.float32, 64),
        ("mlp", torch.bfloat16, 128),
    ],
    ids=lambda v: str(v).removeprefix("torch."),
)
def test_gpu_gradients_match_reference(kind, dtype, D, rng):
    """Many programs (B * H = 128), a partial last mini-batch; inputs rounded to dtype, compared
    with the float64 reference on the rounded values. Each head dim and dtype compiles new
    programs, so only a few combinations run; bench_backward.py checks all of them."""
    seed = rng.initial_seed()
    compare(kind, make_inputs(kind.split("-")[0], 8, 16, 75, D, 16, rng, dtype=dtype), 16, rng, TOL[dtype], seed)


@needs_cuda
def test_gpu_bf16_inputs_float32_state(rng):
    """bfloat16 activations with a float32 initial state and float32 LN and token_idx, as a
    layer passes them under autocast: each gradient comes back in its argument's dtype."""
    seed = rng.initial_seed()
    args = make_inputs("linear", 4, 12, 130, 64, 16, rng)
    for k in ("XQ", "XK", "XV", "eta"):
        args[k] = args[k].bfloat16()
    for k in ("W0", "b0", "ln_weight", "ln_bias", "token_idx"):
        args[k] = args[k].float()
    compare("linear", args, 16, rng, TOL[torch.bfloat16], seed)
