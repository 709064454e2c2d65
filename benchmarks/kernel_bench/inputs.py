"""The benchmark's shapes (a full run on a GPU, or a dry run on the CPU) and its random inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MLP_PARAMS = ("W1", "b1", "W2", "b2")  # the TTT-MLP state's keys in mlp_inputs


@dataclass(frozen=True)
class Scale:
    """Every shape a run uses. H, D, MB: heads, head dim and mini-batch size of the op sections;
    op_cases: (B, T) of the op sections; checks: (B, T, D) of the correctness checks;
    reference_max_tokens: B * T past which the slow reference op is skipped; decode_batch: B of
    the decode sections; model: TTTConfig keywords of the model sections; prefill_cases: (B, T)
    of the model prefill; decode_contexts: prompt lengths before the timed decode; decode_steps:
    steps timed per decode run; step_lengths: T of the single-sequence step section."""

    device: str
    H: int
    D: int
    MB: int
    op_cases: tuple[tuple[int, int], ...]
    checks: tuple[tuple[int, int, int], ...]
    reference_max_tokens: int
    decode_batch: int
    model: dict
    prefill_cases: tuple[tuple[int, int], ...]
    decode_contexts: tuple[int, ...]
    decode_steps: int
    step_lengths: tuple[int, ...]


def full_scale() -> Scale:
    from ttt_helpers.model import TTT_STANDARD_CONFIGS

    return Scale(
        device="cuda",
        H=12,
        D=64,
        MB=16,
        op_cases=((8, 2048), (2, 8192), (1, 16384), (16, 8192)),
        checks=((2, 1000, 64), (2, 333, 32), (1, 333, 128), (4, 2048, 64)),
        reference_max_tokens=32768,
        decode_batch=64,
        model=dict(TTT_STANDARD_CONFIGS["125m"]),
        # batch 1 (latency), 8, and the paper's 16 (throughput)
        prefill_cases=(
            (1, 2048),
            (1, 8192),
            (1, 16384),
            (1, 32768),
            (8, 2048),
            (16, 2048),
            (16, 8192),
            (16, 16384),
            (16, 32768),
        ),
        decode_contexts=(16, 512, 2048, 8192),
        decode_steps=96,
        step_lengths=(2048, 8192, 32768),
    )


def dry_scale() -> Scale:
    """Tiny shapes that run every section's code on the CPU (Triton's interpreter) in about a minute."""
    return Scale(
        device="cpu",
        H=2,
        D=16,
        MB=16,
        op_cases=((1, 40),),
        checks=((1, 37, 16),),
        reference_max_tokens=128,
        decode_batch=2,
        model=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            mini_batch_size=16,
            max_position_embeddings=256,
        ),
        prefill_cases=((1, 40), (2, 24)),
        decode_contexts=(16,),
        decode_steps=3,
        step_lengths=(64,),
    )


def ttt_inputs(
    B: int, H: int, T: int, D: int, dtype: torch.dtype, state_dtype: torch.dtype = torch.float32, device: str = "cuda"
) -> dict:
    """Random inputs of ops.ttt_linear at the scales of a layer: eta ~ base_lr * sigmoid / D."""

    def r(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device=device) * scale).to(dt)

    return dict(
        XQ=r(B, H, T, D),
        XK=r(B, H, T, D),
        XV=r(B, H, T, D),
        eta=(torch.rand(B, H, T, device=device) / D).to(dtype),
        W0=r(B, H, D, D, scale=D**-0.5, dt=state_dtype),
        b0=r(B, H, 1, D, scale=0.1, dt=state_dtype),
        ln_weight=1 + r(H, D, scale=0.2),
        ln_bias=r(H, D, scale=0.2),
    )


def mlp_inputs(
    B: int, H: int, T: int, D: int, dtype: torch.dtype, state_dtype: torch.dtype = torch.float32, device: str = "cuda"
) -> dict:
    """Random inputs of ops.ttt_mlp (hidden width F = 4D) at a layer's scales."""
    args = ttt_inputs(B, H, T, D, dtype, state_dtype, device)
    del args["W0"], args["b0"]
    F = 4 * D

    def r(*shape, scale):
        return (torch.randn(*shape, device=device) * scale).to(state_dtype)

    return {
        **args,
        "W1": r(B, H, D, F, scale=D**-0.5),
        "b1": r(B, H, 1, F, scale=0.1),
        "W2": r(B, H, F, D, scale=F**-0.5),
        "b2": r(B, H, 1, D, scale=0.1),
    }


def decode_tokens(args: dict, steps: int) -> list[tuple[torch.Tensor, ...]]:
    """(xq, xk, xv, eta) of each of the first `steps` tokens of `args`, contiguous, as a decoder gets them."""
    return [
        (*(args[k][:, :, t : t + 1].contiguous() for k in ("XQ", "XK", "XV")), args["eta"][:, :, t].contiguous())
        for t in range(steps)
    ]


def decode_state(params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A decode step's state at a mini-batch boundary: copies of the params and zero gradient sums."""
    copies = tuple(p.clone() for p in params)
    return copies + tuple(torch.zeros_like(p) for p in copies)


def reference_decode(step, tokens: list, state: tuple, lnw: torch.Tensor, lnb: torch.Tensor, token_idx: torch.Tensor):
    """A function that decodes `tokens` (one mini-batch) with the PyTorch reference `step`
    (ops.ttt_linear_step or ops.ttt_mlp_step), then commits; float32, the state carried across calls."""
    from ttt_helpers import ops

    tokens = [tuple(x.float() for x in tok) for tok in tokens]
    carried = [tuple(t.float() for t in state)]

    def run() -> None:
        state = carried[0]
        for t, tok in enumerate(tokens):
            _, state = step(*tok, state, t, lnw.float(), lnb.float(), token_idx)
        carried[0] = ops.commit_state(state, token_idx[-1])

    return run


def to64(args: dict) -> dict:
    return {k: v.to(torch.float64) for k, v in args.items()}
