"""The prefill's tl.dot precision choices for bf16 inputs: time and error of each, the evidence
behind kernels.common.PRECISION_16BIT."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ttt_helpers.testing import rel_err

from .inputs import Scale, to64, ttt_inputs
from .timing import Runner


@contextmanager
def products_in(variant: tuple[str, str]):
    """The kernels' (W products, gradient products) precisions for 16-bit inputs set to `variant`
    inside the block (kernels.common.PRECISION_16BIT), and the default back after it."""
    from ttt_helpers.kernels import common

    default = common.PRECISION_16BIT
    common.PRECISION_16BIT = variant
    try:
        yield
    finally:
        common.PRECISION_16BIT = default


def precision_variants(run: Runner, scale: Scale) -> list[dict]:
    """Each (W products, gradient products) precision: prefill time at a long single sequence and
    at a large batch, and the error of Z and the final W against float64 at a short and a long T."""
    from ttt_helpers import ops
    from ttt_helpers.kernels import common, ttt_linear_prefill

    H, D = scale.H, scale.D
    timed_cases = ((1, 16384), (16, 8192)) if run.cuda else scale.op_cases
    error_lengths = (2048, 65536) if run.cuda else (scale.op_cases[0][1],)
    default, rows = common.PRECISION_16BIT, []
    for variant in (("bf16", "bf16"), ("tf32", "bf16"), ("bf16", "tf32"), ("tf32", "tf32")):
        row = {"W_products": variant[0], "grad_products": variant[1], "default": variant == default}
        with products_in(variant):
            for B, T in timed_cases:
                args = ttt_inputs(B, H, T, D, torch.bfloat16, device=run.device)
                run.attempt(row, f"ms_B{B}_T{T}", lambda: run.fast_ms(lambda: ttt_linear_prefill(**args)))
                del args
            for T in error_lengths:

                def check():
                    args = ttt_inputs(1, 4, T, D, torch.bfloat16, device=run.device)
                    Z, W, _ = ttt_linear_prefill(**args)
                    Zr, Wr, _ = ops.ttt_linear(**to64(args))
                    return {
                        "Z": rel_err(Z, Zr),
                        "W_T": rel_err(W, Wr),
                        "Z_bf16_rounding_alone": rel_err(Zr.bfloat16(), Zr),
                    }

                run.attempt(row, f"rel_err_B1_H4_T{T}", check)
        rows.append(row)
        print(f"  {row}", flush=True)
    return rows
