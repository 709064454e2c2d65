"""Benchmark the TTT Triton kernels on one GPU, in one run, and write the results as JSON.

    python benchmarks/bench_kernels.py            # op level, correctness, decode, roofline
    python benchmarks/bench_kernels.py --model    # plus 125M-model prefill and decode vs a Llama

Writes benchmarks/results/kernels_<gpu>.json after every section (a run cut short keeps what
it measured). A case that fails records its error and the run goes on. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

H, D, MB = 12, 64, 16  # heads, head dim and mini-batch size of the 125M model's TTT layers
OP_CASES = [(8, 2048), (2, 8192), (1, 16384), (16, 8192)]  # (B, T)
REFERENCE_MAX_TOKENS = 32768  # the PyTorch reference op loops over mini-batches: skip it past B * T of this
DECODE_BATCH = 64
MLP_PARAMS = ("W1", "b1", "W2", "b2")  # the TTT-MLP state's keys in mlp_inputs
FLA_NOTE = (
    "fla's chunk_ttt_linear / fused_chunk_ttt_linear take [B, T, H, D] inputs, scale queries by 1/sqrt(D), "
    "weight row i of each mini-batch by its query's eta[i] (the paper and ops.ttt_linear weight column s by "
    "token s's eta[s] times token_idx[i]), and return z + LN(z) where the paper returns XQ + LN(z). Same "
    "shapes and the same amount of work, different math: compare speed only."
)


# ---------------------------------------------------------------- FLOP and byte counts


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


def roofline(flops: float, nbytes: float, peak_flops: float, peak_bytes: float, ms: float) -> dict:
    """Time floor = max(FLOPs / peak FLOP/s, bytes / peak bytes/s); fraction = floor / measured time."""
    compute_ms, memory_ms = flops / peak_flops * 1e3, nbytes / peak_bytes * 1e3
    floor = max(compute_ms, memory_ms)
    return {
        "flops": flops,
        "bytes": nbytes,
        "bound": "compute" if compute_ms >= memory_ms else "memory",
        "floor_ms": floor,
        "fraction_of_floor": floor / ms,
    }


# ---------------------------------------------------------------- timing and bookkeeping


def bench_ms(fn, warmup: int = 25, rep: int = 200) -> float:
    """Median milliseconds of fn() (triton.testing.do_bench: CUDA events, warm-up, many repeats)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def slow_ms(fn, repeats: int = 3) -> float:
    """Median milliseconds of a slow fn() over a few runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def attempt(record: dict, key: str, fn):
    """record[key] = fn(); on failure record the error in record["errors"][key] and go on."""
    try:
        record[key] = fn()
    except Exception as exc:  # one failing case must not stop the run
        record.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}".strip()[:2000]
        print(f"  {key} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        traceback.print_exc(limit=3)
    finally:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return record.get(key)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def provenance() -> dict:
    import triton

    def shell(*cmd: str) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except Exception as exc:
            return f"unavailable ({type(exc).__name__})"
        return done.stdout.strip() if done.returncode == 0 else f"unavailable ({done.stderr.strip()[:200]})"

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": shell("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        # a copy of the tree without its .git can name the commit it was made from in GIT_COMMIT
        "git_commit": os.environ.get("GIT_COMMIT") or shell("git", "-C", str(ROOT), "rev-parse", "--verify", "HEAD"),
    }


def dry_provenance() -> dict:
    import triton

    return {
        "gpu": "none (dry run on the CPU: Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def results_path(name: str, prov: dict) -> Path:
    """benchmarks/results/<name>_<gpu>.json, the GPU's name in lower case with underscores."""
    gpu = re.sub(r"[^a-z0-9]+", "_", prov["gpu"].lower()).strip("_")
    return ROOT / "benchmarks" / "results" / f"{name}_{gpu}.json"


def measure_peaks() -> dict:
    """The two ceilings of the roofline, measured here: a bf16 matrix product and a device copy."""
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul_ms = bench_ms(lambda: a @ b)
    del a, b
    src = torch.randn(2**28, device="cuda")  # 1 GiB of float32
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()  # read + write
    del src, dst
    torch.cuda.empty_cache()
    return {
        "bf16_matmul_tflops": 2 * n**3 / matmul_ms / 1e9,
        "matmul_shape": [n, n, n],
        "copy_gbps": nbytes / copy_ms / 1e6,
        "copy_bytes_read_plus_written": nbytes,
    }


# ---------------------------------------------------------------- inputs


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


# ---------------------------------------------------------------- sections


def correctness() -> list[dict]:
    """Relative error of both kernels against ops in float64, on fresh random inputs."""
    from ttt_helpers import ops
    from ttt_helpers.kernels import TTTLinearDecoder, ttt_linear_prefill

    rows = []
    for dtype, tol in ((torch.bfloat16, 5e-3), (torch.float32, 1e-5)):
        for B, T, d in ((2, 1000, 64), (2, 333, 32), (1, 333, 128), (4, 2048, 64)):
            row = {
                "kernel": "prefill",
                "dtype": str(dtype).removeprefix("torch."),
                "B": B,
                "H": 4,
                "T": T,
                "D": d,
                "tolerance": tol,
            }

            def check():
                args = ttt_inputs(B, 4, T, d, dtype)
                Z, W, b = ttt_linear_prefill(**args)
                Zr, Wr, br = ops.ttt_linear(**to64(args))
                return {"Z": rel_err(Z, Zr), "W_T": rel_err(W, Wr), "b_T": rel_err(b, br)}

            errs = attempt(row, "rel_err", check)
            row["ok"] = bool(errs) and max(errs.values()) < tol
            rows.append(row)
            print(f"  prefill {row['dtype']:8s} B={B} T={T} D={d}: {errs}", flush=True)

        row = {
            "kernel": "decode (CUDA graph)",
            "dtype": str(dtype).removeprefix("torch."),
            "B": 8,
            "H": 4,
            "T": 40,
            "D": 64,
            "tolerance": tol,
        }

        def check_decode():
            args = ttt_inputs(8, 4, 40, 64, dtype)
            decoder = TTTLinearDecoder(
                decode_state((args["W0"], args["b0"])),
                0,
                args["ln_weight"],
                args["ln_bias"],
                ops.default_token_idx(MB, device="cuda"),
            )
            Z = torch.cat([decoder.step(*tok).clone() for tok in decode_tokens(args, 40)], dim=2)
            return {"Z": rel_err(Z, ops.ttt_linear(**to64(args))[0])}

        errs = attempt(row, "rel_err", check_decode)
        row["ok"] = bool(errs) and max(errs.values()) < tol
        rows.append(row)
        print(f"  decode  {row['dtype']:8s}: {errs}", flush=True)
    return rows


def precision_variants() -> list[dict]:
    """Time and error of the prefill's tl.dot precision choices for bf16 inputs (the W products,
    the gradient products): the evidence behind kernels.common.PRECISION_16BIT."""
    from ttt_helpers import ops
    from ttt_helpers.kernels import common, ttt_linear_prefill

    default, rows = common.PRECISION_16BIT, []
    try:
        for variant in (("bf16", "bf16"), ("tf32", "bf16"), ("bf16", "tf32"), ("tf32", "tf32")):
            common.PRECISION_16BIT = variant
            row = {"W_products": variant[0], "grad_products": variant[1], "default": variant == default}
            for B, T in ((1, 16384), (16, 8192)):
                args = ttt_inputs(B, H, T, D, torch.bfloat16)
                attempt(row, f"ms_B{B}_T{T}", lambda: bench_ms(lambda: ttt_linear_prefill(**args)))
                del args
            for T in (2048, 65536):

                def check():
                    args = ttt_inputs(1, 4, T, D, torch.bfloat16)
                    Z, W, _ = ttt_linear_prefill(**args)
                    Zr, Wr, _ = ops.ttt_linear(**to64(args))
                    return {
                        "Z": rel_err(Z, Zr),
                        "W_T": rel_err(W, Wr),
                        "Z_bf16_rounding_alone": rel_err(Zr.bfloat16(), Zr),
                    }

                attempt(row, f"rel_err_B1_H4_T{T}", check)
            rows.append(row)
            print(f"  {row}", flush=True)
    finally:
        common.PRECISION_16BIT = default
    return rows


def op_level(peaks: dict) -> list[dict]:
    """Forward time of one TTT-Linear op (H=12, D=64, bf16) against fla and causal SDPA."""
    import torch.nn.functional as F

    from ttt_helpers import ops
    from ttt_helpers.kernels import ttt_linear_prefill

    try:
        from fla.ops.ttt import chunk_ttt_linear, fused_chunk_ttt_linear
    except ImportError as exc:
        chunk_ttt_linear = fused_chunk_ttt_linear = None
        fla_missing = f"not installed ({exc})"

    peak_flops, peak_bytes = peaks["bf16_matmul_tflops"] * 1e12, peaks["copy_gbps"] * 1e9
    rows = []
    for B, T in OP_CASES:
        row = {"B": B, "T": T, "H": H, "D": D, "dtype": "bfloat16", "state_dtype": "float32", "mini_batch_size": MB}
        print(f"op B={B} T={T}", flush=True)
        args = ttt_inputs(B, H, T, D, torch.bfloat16)
        with torch.no_grad():
            attempt(row, "ours_ms", lambda: bench_ms(lambda: ttt_linear_prefill(**args)))
            # the layout a model produces: [B, T, H, D] projections viewed as [B, H, T, D]
            bthd = {
                k: (v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("XQ", "XK", "XV") else v)
                for k, v in args.items()
            }
            attempt(row, "ours_bthd_layout_ms", lambda: bench_ms(lambda: ttt_linear_prefill(**bthd)))
            del bthd
            q, k, v = (args[n].transpose(1, 2).contiguous() for n in ("XQ", "XK", "XV"))
            eta = args["eta"].transpose(1, 2).unsqueeze(-1).contiguous()
            fla_kw = dict(
                initial_state=args["W0"], initial_state_bias=args["b0"], output_final_state=True, chunk_size=MB
            )
            for key, fn in (("fla_chunk_ms", chunk_ttt_linear), ("fla_fused_chunk_ms", fused_chunk_ttt_linear)):
                if fn is None:
                    row[key] = fla_missing
                else:
                    attempt(
                        row,
                        key,
                        lambda fn=fn: bench_ms(lambda: fn(q, k, v, args["ln_weight"], args["ln_bias"], eta, **fla_kw)),
                    )
            del q, k, v, eta
            attempt(
                row,
                "sdpa_causal_ms",
                lambda: bench_ms(
                    lambda: F.scaled_dot_product_attention(args["XQ"], args["XK"], args["XV"], is_causal=True)
                ),
            )
            if B * T <= REFERENCE_MAX_TOKENS:  # the reference wants one dtype: a bf16 state here
                ref_args = {**args, "W0": args["W0"].bfloat16(), "b0": args["b0"].bfloat16()}
                attempt(row, "reference_ms", lambda: slow_ms(lambda: ops.ttt_linear(**ref_args)))
                del ref_args
            else:
                row["reference_ms"] = f"skipped: B*T > {REFERENCE_MAX_TOKENS}"
        ttt_cost = (ttt_linear_flops(B, H, T, D, MB), ttt_linear_bytes(B, H, T, D, 2, 4))
        row["roofline"] = {}
        for key, (flops, nbytes) in (
            ("ours_ms", ttt_cost),
            ("fla_chunk_ms", ttt_cost),
            ("sdpa_causal_ms", (sdpa_flops(B, H, T, D), sdpa_bytes(B, H, T, D, 2))),
        ):
            if isinstance(row.get(key), float):
                row["roofline"][key.removesuffix("_ms")] = roofline(flops, nbytes, peak_flops, peak_bytes, row[key])
        rows.append(row)
        del args
        torch.cuda.empty_cache()
        print(
            "  " + ", ".join(f"{k}={v:.3f}" for k, v in row.items() if k.endswith("_ms") and isinstance(v, float)),
            flush=True,
        )
    return rows


def decode(peaks: dict) -> dict:
    """Tokens/s of one TTT-Linear layer's decode step at batch 64: eager, CUDA graph, reference."""
    from ttt_helpers import ops
    from ttt_helpers.kernels import TTTLinearDecoder, ttt_linear_decode

    B, steps = DECODE_BATCH, MB  # time one whole mini-batch of steps: 15 accumulate, 1 commits
    result = {
        "B": B,
        "H": H,
        "D": D,
        "mini_batch_size": MB,
        "input_dtype": "bfloat16",
        "state_dtype": "float32",
        "steps_per_timed_call": steps,
    }
    args = ttt_inputs(B, H, steps, D, torch.bfloat16)
    tokens = decode_tokens(args, steps)
    token_idx = ops.default_token_idx(MB, device="cuda")
    lnw, lnb = args["ln_weight"], args["ln_bias"]
    state = decode_state((args["W0"], args["b0"]))

    def eager():
        for t, tok in enumerate(tokens):
            ttt_linear_decode(*tok, state, t, lnw, lnb, token_idx)

    graphed = TTTLinearDecoder(decode_state((args["W0"], args["b0"])), 0, lnw, lnb, token_idx)

    def graph_copy_inputs():
        for tok in tokens:
            graphed.step(*tok)

    def graph_inputs_in_place():  # a caller that writes its projections straight into decoder.inputs
        for _ in tokens:
            graphed.step(*graphed.inputs)

    reference = reference_decode(
        ops.ttt_linear_step, tokens, decode_state((args["W0"], args["b0"])), lnw, lnb, token_idx
    )

    peak_flops, peak_bytes = peaks["bf16_matmul_tflops"] * 1e12, peaks["copy_gbps"] * 1e9
    flops, nbytes = decode_flops(B, H, D), decode_bytes(B, H, D, MB, 2, 4)
    with torch.no_grad():
        for key, fn in (
            ("eager", eager),
            ("cuda_graph", graph_copy_inputs),
            ("cuda_graph_inputs_in_place", graph_inputs_in_place),
            ("reference_pytorch", reference),
        ):
            ms = attempt(result, f"{key}_ms_per_{steps}_steps", lambda fn=fn: bench_ms(fn))
            if ms is not None:
                per_token = ms / steps
                result[key] = {
                    "ms_per_token_step": per_token,
                    "tokens_per_s": B / per_token * 1e3,
                    "roofline": roofline(flops, nbytes, peak_flops, peak_bytes, per_token),
                }
                print(f"  decode {key}: {per_token * 1e3:.1f} us/step, {B / per_token * 1e3:,.0f} tokens/s", flush=True)
    return result


def mlp_correctness() -> list[dict]:
    """Relative error of the TTT-MLP kernels against ops.ttt_mlp in float64 (Z and the final state
    of the prefill; Z of 40 decode steps), on fresh random inputs."""
    from ttt_helpers import ops
    from ttt_helpers.kernels import ttt_mlp_decode, ttt_mlp_prefill

    rows = []
    names = ("Z", "W1_T", "b1_T", "W2_T", "b2_T")
    for dtype, tol in ((torch.bfloat16, 5e-3), (torch.float32, 1e-5)):
        for kernel, B, T, d in (
            ("prefill", 2, 1000, 64),
            ("prefill", 2, 333, 32),
            ("prefill", 1, 333, 128),
            ("prefill", 4, 2048, 64),
            ("decode", 8, 40, 64),
        ):
            row = {"kernel": kernel, "dtype": str(dtype).removeprefix("torch."), "B": B, "H": 4, "T": T, "D": d}
            row["tolerance"] = tol

            def check():
                args = mlp_inputs(B, 4, T, d, dtype)
                refs = ops.ttt_mlp(**to64(args))
                if kernel == "prefill":
                    return {name: rel_err(out, ref) for name, out, ref in zip(names, ttt_mlp_prefill(**args), refs)}
                state = decode_state(tuple(args[k] for k in MLP_PARAMS))
                token_idx = ops.default_token_idx(MB, device="cuda")
                Z = [
                    ttt_mlp_decode(*tok, state, t % MB, args["ln_weight"], args["ln_bias"], token_idx).clone()
                    for t, tok in enumerate(decode_tokens(args, T))
                ]
                return {"Z": rel_err(torch.cat(Z, 2), refs[0])}

            errs = attempt(row, "rel_err", check)
            row["ok"] = bool(errs) and max(errs.values()) < tol
            rows.append(row)
            print(f"  mlp {kernel} {row['dtype']:8s} B={B} T={T} D={d}: {errs}", flush=True)
    return rows


def mlp_op_level(peaks: dict) -> list[dict]:
    """Forward time of one TTT-MLP op (H=12, D=64, F=256, bf16 inputs, float32 state): our
    prefill kernel against the PyTorch reference ops.ttt_mlp (no peer library has a TTT-MLP op)."""
    from ttt_helpers import ops
    from ttt_helpers.kernels import ttt_mlp_prefill

    peak_flops, peak_bytes = peaks["bf16_matmul_tflops"] * 1e12, peaks["copy_gbps"] * 1e9
    F, rows = 4 * D, []
    for B, T in OP_CASES:
        row = {"B": B, "T": T, "H": H, "D": D, "F": F, "dtype": "bfloat16", "state_dtype": "float32"}
        args = mlp_inputs(B, H, T, D, torch.bfloat16)
        with torch.no_grad():
            attempt(row, "ours_ms", lambda: bench_ms(lambda: ttt_mlp_prefill(**args)))
            if B * T <= REFERENCE_MAX_TOKENS:
                ref_args = {k: v.bfloat16() for k, v in args.items()}  # the reference wants one dtype
                attempt(row, "reference_ms", lambda: slow_ms(lambda: ops.ttt_mlp(**ref_args)))
                del ref_args
            else:
                row["reference_ms"] = f"skipped: B*T > {REFERENCE_MAX_TOKENS}"
        if isinstance(row.get("ours_ms"), float):
            flops, nbytes = ttt_mlp_flops(B, H, T, D, MB, F), ttt_mlp_bytes(B, H, T, D, F, 2, 4)
            row["roofline"] = {"ours": roofline(flops, nbytes, peak_flops, peak_bytes, row["ours_ms"])}
            # what the two passes stream through the L2 cache: W1 and W2 read twice and written once
            row["state_bytes_streamed_per_minibatch_per_head"] = 3 * 2 * D * F * 4
        rows.append(row)
        del args
        torch.cuda.empty_cache()
        print(f"  mlp op B={B} T={T}: {row.get('ours_ms')} ms, reference {row.get('reference_ms')}", flush=True)
    return rows


def mlp_decode() -> dict:
    """Tokens/s of one TTT-MLP layer's decode step at batch 64 (eager launches; the model section
    replays whole steps from CUDA graphs) against the reference ops.ttt_mlp_step."""
    from ttt_helpers import ops
    from ttt_helpers.kernels import ttt_mlp_decode

    B = DECODE_BATCH
    result = {"B": B, "H": H, "D": D, "F": 4 * D, "input_dtype": "bfloat16", "state_dtype": "float32"}
    args = mlp_inputs(B, H, MB, D, torch.bfloat16)
    state = decode_state(tuple(args[k] for k in MLP_PARAMS))
    tokens = decode_tokens(args, MB)
    token_idx = ops.default_token_idx(MB, device="cuda")
    lnw, lnb = args["ln_weight"], args["ln_bias"]

    def eager():
        for t, tok in enumerate(tokens):
            ttt_mlp_decode(*tok, state, t, lnw, lnb, token_idx)

    reference = reference_decode(ops.ttt_mlp_step, tokens, state, lnw, lnb, token_idx)

    with torch.no_grad():
        for key, fn in (("eager", eager), ("reference_pytorch", reference)):
            ms = attempt(result, f"{key}_ms_per_{MB}_steps", lambda fn=fn: bench_ms(fn))
            if ms is not None:
                result[key] = {"ms_per_token_step": ms / MB, "tokens_per_s": B / (ms / MB) * 1e3}
                print(f"  mlp decode {key}: {ms / MB * 1e3:.1f} us/step", flush=True)
    return result


def _decode_tokens_per_s(model, prompt: torch.Tensor, steps: int, graph: bool) -> float:
    """Greedy decode of `steps` tokens per sequence after reading `prompt`; tokens/s of the decode.
    graph: through CUDAGraphDecoder, after 16 untimed steps that capture every position's graph."""
    from ttt_helpers.compat import output_cache
    from ttt_helpers.kernels import CUDAGraphDecoder

    out = model(prompt, use_cache=True, logits_to_keep=1)
    cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    if graph:
        decoder = CUDAGraphDecoder(model, cache)
        for _ in range(16):
            token = decoder.step(token)[:, -1:].argmax(-1)
    gc.collect()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        if graph:
            token = decoder.step(token)[:, -1:].argmax(-1)
        else:
            out = model(token, cache=cache, use_cache=True)
            cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    return prompt.shape[0] * steps / (time.perf_counter() - start)


def median_of_3(row: dict, name: str, timed) -> None:
    """row[name + "_tokens_per_s"]: the median of 3 runs of timed() after an untimed warm-up run."""
    attempt(row, f"{name}_warmup_tokens_per_s", timed)
    runs = [attempt(row, f"{name}_tokens_per_s", timed) for _ in range(3)]
    if all(r is not None for r in runs):
        row[f"{name}_tokens_per_s_runs"] = runs
        row[f"{name}_tokens_per_s"] = sorted(runs)[1]


def mlp_model_level() -> dict:
    """The 125M preset with TTT-MLP layers, bf16: prefill and decode through the kernels
    (ttt_impl='kernel'; decode also from CUDA graphs) against the same weights on the reference ops."""
    from ttt_helpers.model import TTT_STANDARD_CONFIGS, TTTConfig, TTTForCausalLM

    config = TTTConfig(**{**TTT_STANDARD_CONFIGS["125m"], "ttt_layer_type": "mlp"})
    ttt = TTTForCausalLM(config).to("cuda", torch.bfloat16).eval()
    result = {
        "note": "as the TTT-Linear model section; the TTT layers are TTT-MLP (hidden width 4 x 64)",
        "params_M": sum(p.numel() for p in ttt.parameters()) / 1e6,
        "prefill": [],
        "decode": [],
    }
    with torch.no_grad():
        for B, T in ((1, 2048), (1, 8192), (1, 16384), (8, 2048)):
            row = {"B": B, "T": T}
            ids = torch.randint(0, config.vocab_size, (B, T), device="cuda")
            for name, impl, timer in (
                ("ttt_mlp_kernel", "kernel", bench_ms),
                ("ttt_mlp_reference", "reference", lambda fn: slow_ms(fn, repeats=1)),
            ):
                if impl == "reference" and B * T > 2048:
                    continue
                ttt.set_ttt_impl(impl)
                ms = attempt(row, f"{name}_ms", lambda f=timer: f(lambda: ttt(ids, use_cache=False, logits_to_keep=1)))
                if ms is not None:
                    row[f"{name}_tokens_per_s"] = B * T / ms * 1e3
            result["prefill"].append(row)
            print(f"  mlp model prefill {row}", flush=True)
        B, steps = DECODE_BATCH, 64
        for context in (16, 512, 2048):
            prompt = torch.randint(0, config.vocab_size, (B, context), device="cuda")
            row = {"B": B, "context": context, "steps": steps}
            for name, impl, graph in (
                ("ttt_mlp_kernel", "kernel", False),
                ("ttt_mlp_kernel_graph", "kernel", True),
                ("ttt_mlp_reference", "reference", False),
            ):
                if impl == "reference" and context > 16:
                    continue
                ttt.set_ttt_impl(impl)
                median_of_3(row, name, lambda g=graph: _decode_tokens_per_s(ttt, prompt, steps, g))
            result["decode"].append(row)
            print(f"  mlp model decode {row}", flush=True)
            del prompt
            torch.cuda.empty_cache()
    return result


def model_level() -> dict:
    """125M TTT-Linear model (kernels through TTTConfig.ttt_impl) against a same-size Llama with SDPA, bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ttt_helpers.model import TTT_STANDARD_CONFIGS, TTTConfig, TTTForCausalLM

    preset = TTT_STANDARD_CONFIGS["125m"]
    ttt = TTTForCausalLM(TTTConfig(**preset)).to("cuda", torch.bfloat16).eval()
    llama = (
        LlamaForCausalLM(
            LlamaConfig(
                **preset,
                num_key_value_heads=preset["num_attention_heads"],
                vocab_size=32000,
                max_position_embeddings=32768,
                tie_word_embeddings=True,
                attn_implementation="sdpa",
            )
        )
        .to("cuda", torch.bfloat16)
        .eval()
    )
    result = {
        "note": "prefill: forward with use_cache=False and logits for the last token only; decode: a "
        "plain Python loop of single-token forwards with the cache (eager, no CUDA graph), after "
        "a prompt of `context` tokens read with the cache. 'ttt_kernel' is the model with "
        "ttt_impl='kernel' (the prefill kernel, and the decode kernel for single tokens), "
        "'ttt_reference' the same weights with ttt_impl='reference' (the PyTorch ops); 'ttt_kernel_graph' "
        "decodes with CUDAGraphDecoder (each step replayed from a CUDA graph, 16 untimed warm-up steps).",
        "params_M": {
            "ttt": sum(p.numel() for p in ttt.parameters()) / 1e6,
            "llama": sum(p.numel() for p in llama.parameters()) / 1e6,
        },
        "prefill": [],
        "decode": [],
    }

    with torch.no_grad():
        for B, T in ((1, 2048), (1, 8192), (1, 16384), (1, 32768), (8, 2048)):
            row = {"B": B, "T": T}
            ids = torch.randint(0, 32000, (B, T), device="cuda")
            for name, model, impl, timer in (
                ("llama_sdpa", llama, None, bench_ms),
                ("ttt_kernel", ttt, "kernel", bench_ms),
                ("ttt_reference", ttt, "reference", lambda fn: slow_ms(fn, repeats=1)),
            ):
                if impl is not None:
                    ttt.set_ttt_impl(impl)
                if name == "ttt_reference" and B * T > 16384:  # about 10 s at 16k tokens
                    continue
                ms = attempt(
                    row, f"{name}_ms", lambda m=model, f=timer: f(lambda: m(ids, use_cache=False, logits_to_keep=1))
                )
                if ms is not None:
                    row[f"{name}_tokens_per_s"] = B * T / ms * 1e3
            result["prefill"].append(row)
            print(f"  model prefill {row}", flush=True)
        B, steps = DECODE_BATCH, 96
        for context in (16, 512, 2048, 8192):
            prompt = torch.randint(0, 32000, (B, context), device="cuda")
            row = {"B": B, "context": context, "steps": steps}
            for name, model, impl in (
                ("llama_sdpa", llama, None),
                ("ttt_kernel", ttt, "kernel"),
                ("ttt_kernel_graph", ttt, "kernel"),
                ("ttt_reference", ttt, "reference"),
            ):
                if impl is not None:
                    ttt.set_ttt_impl(impl)
                if name == "ttt_reference" and context > 512:
                    continue  # its per-token work does not depend on the context; its prompt prefill is slow

                def timed(model=model, graph=name == "ttt_kernel_graph"):
                    return _decode_tokens_per_s(model, prompt, steps, graph)

                median_of_3(row, name, timed)
            result["decode"].append(row)
            print(f"  model decode {row}", flush=True)
            del prompt
            torch.cuda.empty_cache()
    ttt.set_ttt_impl("auto")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="store_true", help="also time the 125M models (a few minutes more)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/kernels_<gpu>.json)")
    parser.add_argument(
        "--only-model",
        action="store_true",
        help="time only the models, keeping the other sections of an existing --out",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
            "the CPU checks are in tests/test_kernels.py"
        )

    started = time.perf_counter()
    from ttt_helpers.kernels import common

    results = {
        "provenance": provenance(),
        "fla_note": FLA_NOTE,
        "kernel_dot_precisions_16bit": dict(zip(("W", "grad"), common.PRECISION_16BIT)),
    }
    out = args.out or results_path("kernels", results["provenance"])
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - started
        out.write_text(json.dumps(results, indent=1) + "\n")

    print(f"{results['provenance']['gpu']}: writing {out}", flush=True)
    if args.only_model:
        kept = json.loads(out.read_text()) if out.exists() else {}
        results = {**kept, "model_provenance": results["provenance"]}
        attempt(results, "model", model_level)
        save()
        attempt(results, "mlp_model", mlp_model_level)
        save()
        print(f"wrote {out} in {results['elapsed_s']:.0f} s", flush=True)
        return
    results["peaks"] = measure_peaks()
    print(
        f"peaks: {results['peaks']['bf16_matmul_tflops']:.0f} TFLOP/s bf16, "
        f"{results['peaks']['copy_gbps']:.0f} GB/s copy",
        flush=True,
    )
    save()
    sections = [
        ("correctness", correctness),
        ("op", lambda: op_level(results["peaks"])),
        ("decode", lambda: decode(results["peaks"])),
        ("precision", precision_variants),
        ("mlp_correctness", mlp_correctness),
        ("mlp_op", lambda: mlp_op_level(results["peaks"])),
        ("mlp_decode", mlp_decode),
    ]
    if args.model:
        sections += [("model", model_level), ("mlp_model", mlp_model_level)]
    for name, section in sections:
        print(f"== {name}", flush=True)
        attempt(results, name, section)
        save()
    print_summary(results)
    print(f"wrote {out} in {results['elapsed_s']:.0f} s", flush=True)


def print_summary(results: dict) -> None:
    keys = ("ours_ms", "ours_bthd_layout_ms", "fla_chunk_ms", "fla_fused_chunk_ms", "sdpa_causal_ms", "reference_ms")
    print("\n  B      T " + "".join(f"{k.removesuffix('_ms'):>16s}" for k in keys) + "   (ms, median)")
    for row in results.get("op", []):
        cells = "".join(f"{row[k]:16.3f}" if isinstance(row.get(k), float) else f"{'-':>16s}" for k in keys)
        print(f"{row['B']:3d} {row['T']:6d} {cells}")
    for row in results.get("correctness", []):
        print(f"  check {row['kernel']} {row['dtype']} D={row['D']} T={row['T']}: ok={row['ok']} {row.get('rel_err')}")
    for row in results.get("mlp_correctness", []):
        print(f"  check mlp {row['kernel']} {row['dtype']} D={row['D']} T={row['T']}: ok={row['ok']}")
    for row in results.get("mlp_op", []):
        print(f"  mlp op B={row['B']} T={row['T']}: ours {row.get('ours_ms')} ms, reference {row.get('reference_ms')}")
    dec = results.get("decode", {})
    for key in ("eager", "cuda_graph", "cuda_graph_inputs_in_place", "reference_pytorch"):
        if key in dec:
            print(f"  decode {key}: {dec[key]['tokens_per_s']:,.0f} tokens/s")


if __name__ == "__main__":
    main()
