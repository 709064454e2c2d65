"""One TTT-MLP op (hidden width F = 4D): its kernels' error against the float64 reference, the
prefill's time against the reference op (no peer library has a TTT-MLP op) with a roofline,
and one layer's decode step."""

from __future__ import annotations

import torch

from ttt_helpers.testing import rel_err

from .counts import roofline, ttt_mlp_bytes, ttt_mlp_flops
from .inputs import MLP_PARAMS, Scale, decode_state, decode_tokens, mlp_inputs, reference_decode, to64
from .op import TOLERANCES
from .timing import Runner


def mlp_correctness(run: Runner, scale: Scale) -> list[dict]:
    """Z and the final W1, b1, W2, b2 of the prefill, and Z of 40 decode steps, against ops.ttt_mlp
    in float64 on fresh random inputs."""
    from ttt_helpers import ops
    from ttt_helpers.kernels import ttt_mlp_decode, ttt_mlp_prefill

    rows = []
    names = ("Z", "W1_T", "b1_T", "W2_T", "b2_T")
    cases = [("prefill", *c) for c in scale.checks] + [("decode", min(8, scale.decode_batch), 40, scale.D)]
    for dtype, tol in TOLERANCES:
        for kernel, B, T, d in cases:
            row = {"kernel": kernel, "dtype": str(dtype).removeprefix("torch."), "B": B, "H": 4, "T": T, "D": d}
            row["tolerance"] = tol

            def check():
                args = mlp_inputs(B, 4, T, d, dtype, device=run.device)
                refs = ops.ttt_mlp(**to64(args))
                if kernel == "prefill":
                    return {name: rel_err(out, ref) for name, out, ref in zip(names, ttt_mlp_prefill(**args), refs)}
                state = decode_state(tuple(args[k] for k in MLP_PARAMS))
                token_idx = ops.default_token_idx(scale.MB, device=run.device)
                Z = [
                    ttt_mlp_decode(*tok, state, t % scale.MB, args["ln_weight"], args["ln_bias"], token_idx).clone()
                    for t, tok in enumerate(decode_tokens(args, T))
                ]
                return {"Z": rel_err(torch.cat(Z, 2), refs[0])}

            errs = run.attempt(row, "rel_err", check)
            row["ok"] = bool(errs) and max(errs.values()) < tol
            rows.append(row)
            print(f"  mlp {kernel} {row['dtype']:8s} B={B} T={T} D={d}: {errs}", flush=True)
    return rows


def mlp_op_level(run: Runner, scale: Scale, peaks: dict) -> list[dict]:
    """Forward time of one TTT-MLP op (bf16 inputs, float32 state): the prefill kernel against ops.ttt_mlp."""
    from ttt_helpers import ops
    from ttt_helpers.kernels import ttt_mlp_prefill

    H, D, MB = scale.H, scale.D, scale.MB
    peak_flops, peak_bytes = peaks["bf16_matmul_tflops"] * 1e12, peaks["copy_gbps"] * 1e9
    F, rows = 4 * D, []
    for B, T in scale.op_cases:
        row = {"B": B, "T": T, "H": H, "D": D, "F": F, "dtype": "bfloat16", "state_dtype": "float32"}
        args = mlp_inputs(B, H, T, D, torch.bfloat16, device=run.device)
        with torch.no_grad():
            run.attempt(row, "ours_ms", lambda: run.fast_ms(lambda: ttt_mlp_prefill(**args)))
            if B * T <= scale.reference_max_tokens:
                ref_args = {k: v.bfloat16() for k, v in args.items()}  # the reference wants one dtype
                run.attempt(row, "reference_ms", lambda: run.slow_ms(lambda: ops.ttt_mlp(**ref_args)))
                del ref_args
            else:
                row["reference_ms"] = f"skipped: B*T > {scale.reference_max_tokens}"
        if isinstance(row.get("ours_ms"), float):
            flops, nbytes = ttt_mlp_flops(B, H, T, D, MB, F), ttt_mlp_bytes(B, H, T, D, F, 2, 4)
            row["roofline"] = {
                "ours": roofline(flops, nbytes, peak_flops, peak_bytes, row["ours_ms"], B * H, peaks.get("sms"))
            }
            # what the two passes stream through the L2 cache: W1 and W2 read twice and written once
            row["state_bytes_streamed_per_minibatch_per_head"] = 3 * 2 * D * F * 4
        rows.append(row)
        del args
        print(f"  mlp op B={B} T={T}: {row.get('ours_ms')} ms, reference {row.get('reference_ms')}", flush=True)
    return rows


def mlp_decode(run: Runner, scale: Scale) -> dict:
    """Tokens/s of one TTT-MLP layer's decode step at the decoding batch (eager launches; the model
    section replays whole steps from CUDA graphs) against the reference ops.ttt_mlp_step."""
    from ttt_helpers import ops
    from ttt_helpers.kernels import ttt_mlp_decode

    B, H, D, MB = scale.decode_batch, scale.H, scale.D, scale.MB
    result = {"B": B, "H": H, "D": D, "F": 4 * D, "input_dtype": "bfloat16", "state_dtype": "float32"}
    args = mlp_inputs(B, H, MB, D, torch.bfloat16, device=run.device)
    state = decode_state(tuple(args[k] for k in MLP_PARAMS))
    tokens = decode_tokens(args, MB)
    token_idx = ops.default_token_idx(MB, device=run.device)
    lnw, lnb = args["ln_weight"], args["ln_bias"]

    def eager():
        for t, tok in enumerate(tokens):
            ttt_mlp_decode(*tok, state, t, lnw, lnb, token_idx)

    reference = reference_decode(ops.ttt_mlp_step, tokens, state, lnw, lnb, token_idx)
    with torch.no_grad():
        for key, fn in (("eager", eager), ("reference_pytorch", reference)):
            ms = run.attempt(result, f"{key}_ms_per_{MB}_steps", lambda fn=fn: run.fast_ms(fn))
            if ms is not None:
                result[key] = {"ms_per_token_step": ms / MB, "tokens_per_s": B / (ms / MB) * 1e3}
                print(f"  mlp decode {key}: {ms / MB * 1e3:.1f} us/step", flush=True)
    return result
