"""Sweep the launch settings of the prefill and decode kernels on one GPU: the evidence behind
the defaults in ttt_helpers/kernels (warps per program, software-pipelining stages, and the
TTT-MLP chunk width FB).

    python benchmarks/tune_kernels.py          # writes benchmarks/results/tuning_<gpu>.json

Each setting is applied by wrapping the kernel's launch, so the wrappers' checks and argument
handling are the ones the library uses. Times are medians of triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import attempt, bench_ms, mlp_inputs, provenance, rel_err, results_path, to64, ttt_inputs  # noqa: E402

H, D, MB = 12, 64, 16


class _Launch:
    """kernel[grid](...) with some launch keywords replaced."""

    def __init__(self, kernel, **overrides) -> None:
        self.kernel, self.overrides = kernel, overrides

    def __getitem__(self, grid):
        launcher = self.kernel[grid]
        return lambda *args, **kwargs: launcher(*args, **{**kwargs, **self.overrides})


def with_launch(module, name: str, **overrides):
    """Make `module`'s next launches of kernel `name` use `overrides`; returns a function that undoes it."""
    real = module._programs

    module._programs = lambda: SimpleNamespace(**{name: _Launch(getattr(real(), name), **overrides)})
    return lambda: setattr(module, "_programs", real)


def sweep_linear_prefill() -> list[dict]:
    from ttt_helpers import ops
    from ttt_helpers.kernels import ttt_linear as module

    rows = []
    cases = [(8, 2048), (2, 8192), (1, 16384)]
    inputs = {case: ttt_inputs(case[0], H, case[1], D, torch.bfloat16) for case in cases}
    check = ttt_inputs(1, 4, 4096, D, torch.bfloat16)
    Z_ref = ops.ttt_linear(**to64(check))[0]
    for warps in (4, 8):
        for stages in (1, 2, 3, 4):
            row = {"num_warps": warps, "num_stages": stages}
            undo = with_launch(module, "ttt_linear_prefill_kernel", num_warps=warps, num_stages=stages)
            try:
                for B, T in cases:
                    attempt(
                        row,
                        f"ms_B{B}_T{T}",
                        lambda B=B, T=T: bench_ms(lambda: module.ttt_linear_prefill(**inputs[(B, T)])),
                    )
                attempt(row, "rel_err_Z_B1_H4_T4096", lambda: rel_err(module.ttt_linear_prefill(**check)[0], Z_ref))
            finally:
                undo()
            rows.append(row)
            print(f"  linear prefill {row}", flush=True)
    return rows


def sweep_mlp() -> dict:
    from ttt_helpers import ops
    from ttt_helpers.kernels import ttt_mlp as module

    prefill, decode = [], []
    cases = [(8, 2048), (2, 8192)]
    inputs = {case: mlp_inputs(case[0], H, case[1], D, torch.bfloat16) for case in cases}
    check = mlp_inputs(1, 4, 2048, D, torch.bfloat16)
    Z_ref = ops.ttt_mlp(**to64(check))[0]
    for fb in (16, 32, 64):
        for warps in (4, 8):
            row = {"FB": fb, "num_warps": warps}
            undo = with_launch(module, "ttt_mlp_prefill_kernel", FB=fb, num_warps=warps)
            try:
                for B, T in cases:
                    attempt(
                        row,
                        f"ms_B{B}_T{T}",
                        lambda B=B, T=T: bench_ms(lambda: module.ttt_mlp_prefill(**inputs[(B, T)])),
                    )
                attempt(row, "rel_err_Z_B1_H4_T2048", lambda: rel_err(module.ttt_mlp_prefill(**check)[0], Z_ref))
            finally:
                undo()
            prefill.append(row)
            print(f"  mlp prefill {row}", flush=True)
    inputs.clear()
    B = 64
    args = mlp_inputs(B, H, MB, D, torch.bfloat16)
    params = tuple(args[k] for k in ("W1", "b1", "W2", "b2"))
    state = params + tuple(torch.zeros_like(p) for p in params)
    token_idx = ops.default_token_idx(MB, device="cuda")
    tokens = [
        (*(args[k][:, :, t : t + 1].contiguous() for k in ("XQ", "XK", "XV")), args["eta"][:, :, t].contiguous())
        for t in range(MB)
    ]
    for fb in (16, 32, 64):
        for warps in (2, 4, 8):
            row = {"FB": fb, "num_warps": warps, "B": B}
            undo = with_launch(module, "ttt_mlp_decode_kernel", FB=fb, num_warps=warps)

            def steps():
                for t, tok in enumerate(tokens):
                    module.ttt_mlp_decode(*tok, state, t, args["ln_weight"], args["ln_bias"], token_idx)

            try:
                attempt(row, "us_per_step", lambda: bench_ms(steps) / MB * 1e3)
            finally:
                undo()
            decode.append(row)
            print(f"  mlp decode {row}", flush=True)
    return {"prefill": prefill, "decode": decode}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_kernels.py needs a CUDA GPU")
    started = time.perf_counter()
    results = {"provenance": provenance(), "shapes": {"H": H, "D": D, "mini_batch_size": MB, "dtype": "bfloat16"}}
    out = args.out or results_path("tuning", results["provenance"])
    with torch.no_grad():
        attempt(results, "linear_prefill", sweep_linear_prefill)
        attempt(results, "mlp", sweep_mlp)
    results["elapsed_s"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out} in {results['elapsed_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
