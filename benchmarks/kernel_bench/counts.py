"""FLOP and byte counts of the kernels' work, and the roofline line they give (benchmarks/README.md)."""

from __future__ import annotations


def ttt_linear_flops(B: int, H: int, T: int, D: int, mini_batch_size: int) -> int:
    """Matrix-product FLOPs of the dual form, per token and head 6 D^2 + 4 b D: x_k W, x_q W and the
    state update x_k^T (e g) are [b, D] x [D, D]; x_q x_k^T and (e * A) g are b x b blocks.
    The O(D) element-wise work (layer norms, masks) is left out."""
    return B * H * T * (6 * D * D + 4 * mini_batch_size * D)


def ttt_linear_bytes(B: int, H: int, T: int, D: int, elt: int, state_elt: int) -> int:
    """Fewest bytes a prefill must move: read XQ, XK, XV, eta and write Z ((4 D + 1) per token),
    read W0, b0 and write W_T, b_T (2 (D^2 + D) per head)."""
    return B * H * (T * (4 * D + 1) * elt + 2 * (D * D + D) * state_elt)


def sdpa_flops(B: int, H: int, T: int, D: int) -> int:
    """Causal attention: Q K^T and P V are 2 T^2 D each, halved by the causal mask."""
    return 2 * B * H * T * T * D


def sdpa_bytes(B: int, H: int, T: int, D: int, elt: int) -> int:
    """Read Q, K, V and write O."""
    return 4 * B * H * T * D * elt


def decode_flops(B: int, H: int, D: int) -> int:
    """Per decoded token and head 8 D^2: x_k W, the rank-1 gradient update, W - s grad_W, x_q W_eff."""
    return 8 * B * H * D * D


def decode_bytes(B: int, H: int, D: int, mini_batch_size: int, elt: int, state_elt: int) -> float:
    """Read W and grad_W, write grad_W (3 (D^2 + D) per head), write W at the mini-batch's last token
    (1/b of the steps), read x_q, x_k, x_v, eta and write z ((4 D + 1) per head)."""
    return B * H * ((3 + 1 / mini_batch_size) * (D * D + D) * state_elt + (4 * D + 1) * elt)


def ttt_mlp_flops(B: int, H: int, T: int, D: int, mini_batch_size: int, F: int) -> int:
    """Matrix-product FLOPs of the TTT-MLP prefill as the kernel runs it, per token and head
    16 D F + 4 b (D + F): eight [b, D] x [D, F]-sized products (x_k W1 twice, since the second
    pass recomputes it, x2 W2, the gradient through W2, x_q W1, h W2 and the two weight updates)
    and four b x b blocks (x_q x_k^T and h x2^T, each times the gradients)."""
    return B * H * T * (16 * D * F + 4 * mini_batch_size * (D + F))


def ttt_mlp_bytes(B: int, H: int, T: int, D: int, F: int, elt: int, state_elt: int) -> int:
    """Fewest bytes a TTT-MLP prefill must move from memory: the inputs and Z as in TTT-Linear, and
    the state W1, b1, W2, b2 read and written once (2 (2 D F + F + D) per head)."""
    return B * H * (T * (4 * D + 1) * elt + 2 * (2 * D * F + F + D) * state_elt)


def roofline(
    flops: float,
    nbytes: float,
    peak_flops: float,
    peak_bytes: float,
    ms: float,
    programs: int | None = None,
    sms: int | None = None,
) -> dict:
    """Time floor = max(FLOPs / peak FLOP/s, bytes / peak bytes/s); fraction = floor / measured time.

    With `programs` (the kernel's independent programs: B * H chains for the TTT kernels) and the
    GPU's `sms`, also the per-SM floor: the floor when only min(programs, sms) SMs have work, each
    at its share of the peaks. At B * H = 12 on 132 SMs the whole-GPU fraction mixes how few SMs
    work with how well each works; the per-SM fraction is the second alone."""
    compute_ms, memory_ms = flops / peak_flops * 1e3, nbytes / peak_bytes * 1e3
    floor = max(compute_ms, memory_ms)
    out = {
        "flops": flops,
        "bytes": nbytes,
        "bound": "compute" if compute_ms >= memory_ms else "memory",
        "floor_ms": floor,
        "fraction_of_floor": floor / ms,
    }
    if programs is not None and sms:
        active = min(programs, sms)
        per_sm = floor * sms / active
        out |= {
            "programs": programs,
            "active_sms": active,
            "per_sm_floor_ms": per_sm,
            "fraction_of_per_sm_floor": per_sm / ms,
        }
    return out


# ---------------------------------------------------------------- timing and bookkeeping


def model_decode_bytes(param_bytes: int, layer_state_bytes: float, layers: int) -> float:
    """Fewest bytes one decode step of a whole model moves: every weight read once (the tied
    embedding once, as the head reads all of it) and each layer's recurrent state or KV cache."""
    return param_bytes + layers * layer_state_bytes


def kv_cache_bytes(B: int, context: int, hidden: int, elt: int) -> int:
    """Bytes of one attention layer's K and V for B sequences of `context` tokens (read per step)."""
    return 2 * B * context * hidden * elt
