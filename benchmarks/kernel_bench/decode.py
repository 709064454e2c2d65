"""One TTT-Linear layer's decode step at a decoding batch: eager launches, the CUDA-graph
decoder and the PyTorch reference step, with a roofline."""

from __future__ import annotations

import torch

from .counts import decode_bytes, decode_flops, roofline
from .inputs import Scale, decode_state, decode_tokens, reference_decode, ttt_inputs
from .timing import Runner


def decode(run: Runner, scale: Scale, peaks: dict) -> dict:
    """Microseconds per step and tokens/s over one whole mini-batch of steps (all but the last
    accumulate, the last commits), bf16 inputs, float32 state."""
    from ttt_helpers import ops
    from ttt_helpers.kernels import TTTLinearDecoder, ttt_linear_decode

    B, H, D, MB = scale.decode_batch, scale.H, scale.D, scale.MB
    steps = MB
    result = {
        "B": B, "H": H, "D": D, "mini_batch_size": MB, "input_dtype": "bfloat16", "state_dtype": "float32",
        "steps_per_timed_call": steps,
    }  # fmt: skip
    args = ttt_inputs(B, H, steps, D, torch.bfloat16, device=run.device)
    tokens = decode_tokens(args, steps)
    token_idx = ops.default_token_idx(MB, device=run.device)
    lnw, lnb = args["ln_weight"], args["ln_bias"]
    state = decode_state((args["W0"], args["b0"]))

    def eager():
        for t, tok in enumerate(tokens):
            ttt_linear_decode(*tok, state, t, lnw, lnb, token_idx)

    variants = {"eager": eager}
    if run.cuda:  # CUDA graphs
        graphed = TTTLinearDecoder(decode_state((args["W0"], args["b0"])), 0, lnw, lnb, token_idx)

        def graph_copy_inputs():
            for tok in tokens:
                graphed.step(*tok)

        def graph_inputs_in_place():  # a caller that writes its projections straight into decoder.inputs
            for _ in tokens:
                graphed.step(*graphed.inputs)

        variants |= {"cuda_graph": graph_copy_inputs, "cuda_graph_inputs_in_place": graph_inputs_in_place}
    variants["reference_pytorch"] = reference_decode(
        ops.ttt_linear_step, tokens, decode_state((args["W0"], args["b0"])), lnw, lnb, token_idx
    )

    peak_flops, peak_bytes = peaks["bf16_matmul_tflops"] * 1e12, peaks["copy_gbps"] * 1e9
    flops, nbytes = decode_flops(B, H, D), decode_bytes(B, H, D, MB, 2, 4)
    with torch.no_grad():
        for key, fn in variants.items():
            ms = run.attempt(result, f"{key}_ms_per_{steps}_steps", lambda fn=fn: run.fast_ms(fn))
            if ms is not None:
                per_token = ms / steps
                result[key] = {
                    "ms_per_token_step": per_token,
                    "tokens_per_s": B / per_token * 1e3,
                    "roofline": roofline(flops, nbytes, peak_flops, peak_bytes, per_token, B * H, peaks.get("sms")),
                }
                print(f"  decode {key}: {per_token * 1e3:.1f} us/step, {B / per_token * 1e3:,.0f} tokens/s", flush=True)
    return result
