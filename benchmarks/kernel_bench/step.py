"""The single-sequence bound: one (batch, head) of the TTT-Linear prefill is a chain of T / b
dependent mini-batch steps. The time per step of the real kernel (each schedule, several warp
counts), and the latency of what a step chains, each timed alone (`chains`), in cycles."""

from __future__ import annotations

import torch

from ttt_helpers.testing import rel_err

from .inputs import Scale, to64, ttt_inputs
from .launch import with_launch
from .timing import Runner

WARPS = (1, 2, 4, 8)


def _per_repeat_ns(run: Runner, launch, n_short: int, n_long: int) -> float:
    """Nanoseconds per repetition of a chain kernel: the time of n_long minus that of n_short
    repetitions, over the difference (the launch's fixed cost cancels)."""
    return (
        (run.fast_ms(lambda: launch(n_long), rep=50) - run.fast_ms(lambda: launch(n_short), rep=50))
        * 1e6
        / (n_long - n_short)
    )


def primitives(run: Runner, scale: Scale, clock_mhz: float | None) -> list[dict]:
    """Latency of each chained operation at every warp count, in ns and (with the clock) cycles."""
    from ttt_helpers.kernels.common import precisions

    from . import chains

    D, MB = scale.D, scale.MB
    _, w_precision, grad_precision = precisions(torch.bfloat16)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(MB, D, generator=g) * 0.1).to(run.device)
    w = (torch.linalg.qr(torch.randn(D, D, generator=g))[0]).to(run.device)  # orthogonal: x W keeps its size
    xk, xv = x.bfloat16(), (torch.randn(MB, D, generator=g)).to(run.device).bfloat16()
    out = torch.empty(MB, D, device=run.device)
    out_w = torch.empty(D, D, device=run.device)
    cases = {
        "dot [b,D]x[D,D], W in tf32": lambda n, nw: chains.dot_chain_kernel[(1,)](
            x, w, out, n, D=D, MB=MB, PRECISION=w_precision, num_warps=nw
        ),
        "dot [b,D]x[D,D], bf16": lambda n, nw: chains.dot_chain_kernel[(1,)](
            x, w, out, n, D=D, MB=MB, PRECISION=grad_precision, num_warps=nw
        ),
        "row sum (over D)": lambda n, nw: chains.sum_chain_kernel[(1,)](x, out, n, D=D, MB=MB, AXIS=1, num_warps=nw),
        "column sum (over b)": lambda n, nw: chains.sum_chain_kernel[(1,)](x, out, n, D=D, MB=MB, AXIS=0, num_warps=nw),
        "LN-L2 gradient": lambda n, nw: chains.ln_grad_chain_kernel[(1,)](x, x * 0.5, out, n, D=D, MB=MB, num_warps=nw),
        "recurrence (dot, LN-L2 gradient, update dot)": lambda n, nw: chains.recurrence_chain_kernel[(1,)](
            xk, xv, w, out_w, n, D=D, MB=MB, W_PRECISION=w_precision, GRAD_PRECISION=grad_precision, num_warps=nw
        ),
    }
    n_short, n_long = (1024, 5120) if run.cuda else (2, 4)
    rows = []
    for name, launch in cases.items():
        row = {"op": name}
        for nw in WARPS if run.cuda else (4,):
            ns = run.attempt(
                row, f"ns_warps{nw}", lambda nw=nw: _per_repeat_ns(run, lambda n: launch(n, nw), n_short, n_long)
            )
            if ns is not None and clock_mhz:
                row[f"cycles_warps{nw}"] = ns * clock_mhz / 1e3
        rows.append(row)
        print(f"  chain {row}", flush=True)
    return rows


def kernel_steps(run: Runner, scale: Scale) -> list[dict]:
    """Microseconds per mini-batch step of the prefill at batch 1 (H heads in parallel) for each
    schedule and warp count, the time at a full batch, and the error against float64 with bf16 and float32 inputs."""
    from ttt_helpers import ops
    from ttt_helpers.kernels import ttt_linear as module
    from ttt_helpers.kernels import ttt_linear_prefill

    H, D, MB = scale.H, scale.D, scale.MB
    checks = {dtype: ttt_inputs(1, 4, 1000, D, dtype, device=run.device) for dtype in (torch.bfloat16, torch.float32)}
    refs = {dtype: ops.ttt_linear(**to64(args))[0] for dtype, args in checks.items()}
    inputs = {T: ttt_inputs(1, H, T, D, torch.bfloat16, device=run.device) for T in scale.step_lengths}
    big = scale.op_cases[-1]
    batch = ttt_inputs(*big[:1], H, big[1], D, torch.bfloat16, device=run.device)
    variants = [(schedule, nw) for schedule in ("fused", "split") for nw in (WARPS if run.cuda else (None,))]
    rows = []
    for schedule, nw in variants:
        row = {"schedule": schedule, "num_warps": nw}
        undo = with_launch(module, "ttt_linear_prefill_kernel", **({"num_warps": nw} if nw else {}))
        try:
            for T, args in inputs.items():
                ms = run.attempt(
                    row,
                    f"ms_B1_T{T}",
                    lambda a=args: run.fast_ms(lambda: ttt_linear_prefill(**a, schedule=schedule)),
                )
                if ms is not None:
                    row[f"us_per_step_T{T}"] = ms * 1e3 / (T // MB)
            run.attempt(
                row,
                f"ms_B{big[0]}_T{big[1]}",
                lambda: run.fast_ms(lambda: ttt_linear_prefill(**batch, schedule=schedule)),
            )
            for dtype, args in checks.items():
                run.attempt(
                    row,
                    f"rel_err_Z_{str(dtype).removeprefix('torch.')}_B1_H4_T1000",
                    lambda a=args, d=dtype: rel_err(ttt_linear_prefill(**a, schedule=schedule)[0], refs[d]),
                )
        finally:
            undo()
        rows.append(row)
        print(f"  step {row}", flush=True)
    return rows


def step_latency(run: Runner, scale: Scale, clock_mhz: float | None) -> dict:
    """Both halves: the real kernel's step, and the chained operations' latencies."""
    result = {
        "note": "us_per_step: prefill time at batch 1 over T / b steps (H heads run in parallel, one chain each); "
        "chains: ns per repetition of one operation, each reading the last one's result, one program; "
        "cycles at the GPU's maximum SM clock (sm_clock_mhz)",
        "sm_clock_mhz": clock_mhz,
    }
    with torch.no_grad():
        run.attempt(result, "kernel", lambda: kernel_steps(run, scale))
        run.attempt(result, "chains", lambda: primitives(run, scale, clock_mhz))
    return result
