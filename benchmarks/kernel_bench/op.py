"""One TTT-Linear op: its kernels' error against the float64 reference, and its forward time
against flash-linear-attention's TTT-Linear ops, causal SDPA and the reference, with a roofline."""

from __future__ import annotations

import torch

from ttt_helpers.testing import rel_err

from .counts import roofline, sdpa_bytes, sdpa_flops, ttt_linear_bytes, ttt_linear_flops
from .inputs import Scale, decode_state, decode_tokens, to64, ttt_inputs
from .precision import products_in
from .timing import Runner, sdpa_backend

FLA_NOTE = (
    "fla's chunk_ttt_linear / fused_chunk_ttt_linear take [B, T, H, D] inputs, scale queries by 1/sqrt(D), "
    "weight row i of each mini-batch by its query's eta[i] (the paper and ops.ttt_linear weight column s by "
    "token s's eta[s] times token_idx[i]), and return z + LN(z) where the paper returns XQ + LN(z). Same "
    "shapes and the same amount of work, different math: compare speed only."
)
TOLERANCES = ((torch.bfloat16, 5e-3), (torch.float32, 1e-5))


def correctness(run: Runner, scale: Scale) -> list[dict]:
    """Relative error of the prefill and the CUDA-graph decoder against ops in float64, on fresh
    random inputs (the decoder needs a GPU: the dry run checks the prefill only)."""
    from ttt_helpers import ops
    from ttt_helpers.kernels import TTTLinearDecoder, ttt_linear_prefill

    rows = []
    for dtype, tol in TOLERANCES:
        name = str(dtype).removeprefix("torch.")
        for B, T, d in scale.checks:
            row = {"kernel": "prefill", "dtype": name, "B": B, "H": 4, "T": T, "D": d, "tolerance": tol}

            def check():
                args = ttt_inputs(B, 4, T, d, dtype, device=run.device)
                Z, W, b = ttt_linear_prefill(**args)
                Zr, Wr, br = ops.ttt_linear(**to64(args))
                return {"Z": rel_err(Z, Zr), "W_T": rel_err(W, Wr), "b_T": rel_err(b, br)}

            errs = run.attempt(row, "rel_err", check)
            row["ok"] = bool(errs) and max(errs.values()) < tol
            rows.append(row)
            print(f"  prefill {name:8s} B={B} T={T} D={d}: {errs}", flush=True)
        if not run.cuda:
            continue
        row = {"kernel": "decode (CUDA graph)", "dtype": name, "B": 8, "H": 4, "T": 40, "D": 64, "tolerance": tol}

        def check_decode():
            args = ttt_inputs(8, 4, 40, 64, dtype)
            token_idx = ops.default_token_idx(scale.MB, device="cuda")
            decoder = TTTLinearDecoder(
                decode_state((args["W0"], args["b0"])), 0, args["ln_weight"], args["ln_bias"], token_idx
            )
            Z = torch.cat([decoder.step(*tok).clone() for tok in decode_tokens(args, 40)], dim=2)
            return {"Z": rel_err(Z, ops.ttt_linear(**to64(args))[0])}

        errs = run.attempt(row, "rel_err", check_decode)
        row["ok"] = bool(errs) and max(errs.values()) < tol
        rows.append(row)
        print(f"  decode  {name:8s}: {errs}", flush=True)
    return rows


def fla_autotuners() -> dict[str, object]:
    """The autotuned Triton kernels of fla's TTT ops by name ({} without fla). Their tuning key
    leaves out B and T, so the first shape timed would fix the configuration of every later one:
    `op_level` clears their choices before each shape and records the one each then made."""
    try:
        import importlib
        import pkgutil

        import fla.ops.ttt as package
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return {}
    tuners = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, Autotuner):
                tuners[f"{info.name}.{name}"] = value
    return tuners


def _fla_ops() -> tuple:
    """fla's two TTT-Linear ops, or (None, None, why) when fla is not installed."""
    try:
        from fla.ops.ttt import chunk_ttt_linear, fused_chunk_ttt_linear
    except ImportError as exc:
        return None, None, f"not installed ({exc})"
    return chunk_ttt_linear, fused_chunk_ttt_linear, None


def op_level(run: Runner, scale: Scale, peaks: dict) -> list[dict]:
    """Forward time of one TTT-Linear op (bf16 inputs, float32 state) against fla and causal SDPA."""
    import torch.nn.functional as F

    from ttt_helpers import ops
    from ttt_helpers.kernels import ttt_linear_prefill

    chunk, fused_chunk, fla_missing = _fla_ops() if run.cuda else (None, None, "skipped: dry run")
    H, D, MB = scale.H, scale.D, scale.MB
    peak_flops, peak_bytes = peaks["bf16_matmul_tflops"] * 1e12, peaks["copy_gbps"] * 1e9
    rows = []
    for B, T in scale.op_cases:
        row = {"B": B, "T": T, "H": H, "D": D, "dtype": "bfloat16", "state_dtype": "float32", "mini_batch_size": MB}
        print(f"op B={B} T={T}", flush=True)
        args = ttt_inputs(B, H, T, D, torch.bfloat16, device=run.device)
        with torch.no_grad():
            run.spread_ms(row, "ours_ms", lambda: ttt_linear_prefill(**args))
            with products_in(("bf16", "bf16")):  # fla's choice: the state's products in bf16 too
                run.attempt(row, "ours_bf16_products_ms", lambda: run.fast_ms(lambda: ttt_linear_prefill(**args)))
            # the layout a model produces: [B, T, H, D] projections viewed as [B, H, T, D]
            bthd = {
                k: (v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("XQ", "XK", "XV") else v)
                for k, v in args.items()
            }
            run.attempt(row, "ours_bthd_layout_ms", lambda: run.fast_ms(lambda: ttt_linear_prefill(**bthd)))
            del bthd
            q, k, v = (args[n].transpose(1, 2).contiguous() for n in ("XQ", "XK", "XV"))
            eta = args["eta"].transpose(1, 2).unsqueeze(-1).contiguous()
            fla_kw = dict(
                initial_state=args["W0"], initial_state_bias=args["b0"], output_final_state=True, chunk_size=MB
            )
            tuners = fla_autotuners() if chunk is not None else {}
            for tuner in tuners.values():  # tuned again at this shape
                tuner.cache.clear()
            for key, fn in (("fla_chunk_ms", chunk), ("fla_fused_chunk_ms", fused_chunk)):
                if fn is None:
                    row[key] = fla_missing
                    continue
                timed = lambda fn=fn: fn(q, k, v, args["ln_weight"], args["ln_bias"], eta, **fla_kw)  # noqa: E731
                run.spread_ms(row, key, timed)
            row["fla_configs"] = {name: str(t.best_config) for name, t in tuners.items() if t.cache}
            del q, k, v, eta
            sdpa = lambda: F.scaled_dot_product_attention(args["XQ"], args["XK"], args["XV"], is_causal=True)  # noqa: E731
            run.attempt(row, "sdpa_causal_ms", lambda: run.fast_ms(sdpa))
            run.attempt(row, "sdpa_backend", lambda: sdpa_backend(sdpa, run.device))
            if B * T <= scale.reference_max_tokens:  # the reference wants one dtype: a bf16 state here
                ref_args = {**args, "W0": args["W0"].bfloat16(), "b0": args["b0"].bfloat16()}
                run.attempt(row, "reference_ms", lambda: run.slow_ms(lambda: ops.ttt_linear(**ref_args)))
                del ref_args
            else:
                row["reference_ms"] = f"skipped: B*T > {scale.reference_max_tokens}"
        ttt_cost = (ttt_linear_flops(B, H, T, D, MB), ttt_linear_bytes(B, H, T, D, 2, 4))
        row["roofline"] = {}
        for key, (flops, nbytes) in (
            ("ours_ms", ttt_cost),
            ("fla_chunk_ms", ttt_cost),
            ("sdpa_causal_ms", (sdpa_flops(B, H, T, D), sdpa_bytes(B, H, T, D, 2))),
        ):
            if isinstance(row.get(key), float):
                chains = B * H if key != "sdpa_causal_ms" else None  # one sequential program per (batch, head)
                row["roofline"][key.removesuffix("_ms")] = roofline(
                    flops, nbytes, peak_flops, peak_bytes, row[key], chains, peaks.get("sms")
                )
        rows.append(row)
        del args
        print(
            "  " + ", ".join(f"{k}={v:.3f}" for k, v in row.items() if k.endswith("_ms") and isinstance(v, float)),
            flush=True,
        )
    return rows
