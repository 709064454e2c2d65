"""Sweep the launch settings of the prefill and decode kernels on one GPU: the evidence behind
the defaults in ttt_helpers/kernels (warps per program, software-pipelining stages, and the
TTT-MLP chunk width FB).

    python -m benchmarks.tune_kernels          # writes benchmarks/results/tuning_<gpu>.json

Each setting is applied by wrapping the kernel's launch, so the wrappers' checks and argument
handling are the ones the library uses. Times are medians of triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.kernel_bench.inputs import MLP_PARAMS, decode_state, decode_tokens, mlp_inputs, to64, ttt_inputs
from benchmarks.kernel_bench.launch import with_launch
from benchmarks.kernel_bench.timing import Runner, bench_ms, provenance, results_path
from ttt_helpers.testing import rel_err

attempt = Runner("cuda").attempt  # record[key] = fn(), a failure recorded and the sweep goes on

H, D, MB = 12, 64, 16


def sweep_prefill(prefill, settings: list[dict], cases: dict, check: dict, Z_ref, label: str) -> list[dict]:
    """Time `prefill` (a kernels wrapper) at each (B, T) of `cases` and measure its error on `check`
    against Z_ref, once per launch setting: a dict of launch keywords for its kernel."""
    module = sys.modules[prefill.__module__]
    kernel = f"{prefill.__name__}_kernel"
    rows = []
    for setting in settings:
        row = dict(setting)
        undo = with_launch(module, kernel, **setting)
        try:
            for (B, T), args in cases.items():
                attempt(row, f"ms_B{B}_T{T}", lambda args=args: bench_ms(lambda: prefill(**args)))
            B, H_, T, _ = check["XQ"].shape
            attempt(row, f"rel_err_Z_B{B}_H{H_}_T{T}", lambda: rel_err(prefill(**check)[0], Z_ref))
        finally:
            undo()
        rows.append(row)
        print(f"  {label} {row}", flush=True)
    return rows


def sweep_linear_prefill() -> list[dict]:
    from ttt_helpers import ops
    from ttt_helpers.kernels import ttt_linear_prefill

    cases = {(B, T): ttt_inputs(B, H, T, D, torch.bfloat16) for B, T in ((8, 2048), (2, 8192), (1, 16384))}
    check = ttt_inputs(1, 4, 4096, D, torch.bfloat16)
    settings = [{"num_warps": w, "num_stages": s} for w in (4, 8) for s in (1, 2, 3, 4)]
    Z_ref = ops.ttt_linear(**to64(check))[0]
    return sweep_prefill(ttt_linear_prefill, settings, cases, check, Z_ref, "linear prefill")


def sweep_mlp() -> dict:
    from ttt_helpers import ops
    from ttt_helpers.kernels import ttt_mlp as module

    cases = {(B, T): mlp_inputs(B, H, T, D, torch.bfloat16) for B, T in ((8, 2048), (2, 8192))}
    check = mlp_inputs(1, 4, 2048, D, torch.bfloat16)
    settings = [{"FB": fb, "num_warps": w} for fb in (16, 32, 64) for w in (4, 8)]
    Z_ref = ops.ttt_mlp(**to64(check))[0]
    prefill = sweep_prefill(module.ttt_mlp_prefill, settings, cases, check, Z_ref, "mlp prefill")
    cases.clear()
    decode = []
    B = 64
    args = mlp_inputs(B, H, MB, D, torch.bfloat16)
    state = decode_state(tuple(args[k] for k in MLP_PARAMS))
    token_idx = ops.default_token_idx(MB, device="cuda")
    tokens = decode_tokens(args, MB)
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
