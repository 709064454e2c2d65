"""Benchmark training through the TTT Triton kernels (forward + backward) on one GPU, as JSON.

    python3 -m benchmarks.bench_backward --out benchmarks/results/backward_h200.json
    python3 -m benchmarks.bench_backward --dry-run    # tiny shapes; on a machine without CUDA the
                                                      # kernels run in Triton's interpreter

Sections, each saved as soon as it ends (a case that fails records its error, the run goes on):
gradients of the training kernels against the float64 reference (float32 and bfloat16); the
forward + backward time of one TTT-Linear op against fla's chunk_ttt_linear, causal SDPA and the
reference under autograd; the same for TTT-MLP against its reference; and training tokens/s
(forward, backward, AdamW step, bf16 autocast) of the 125M preset with TTT-Linear, TTT-MLP and a
same-size Llama with SDPA, with peak memory; and that of chapter 5's 25M byte-level TTT-Linear
(train_gpu.py's shape, batch 32, window 512) through the kernels and the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the dry run's kernels run in Triton's interpreter, chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.byte_level_runs import COMMON, SHAPE, WINDOW  # noqa: E402
from benchmarks.kernel_bench import counts, inputs, timing  # noqa: E402
from benchmarks.kernel_bench.op import FLA_NOTE  # noqa: E402
from benchmarks.kernel_bench.timing import Runner  # noqa: E402
from ttt_helpers.testing import rel_err  # noqa: E402

H, D, MB = 12, 64, 16  # heads, head dim and mini-batch size of the 125M model's TTT layers
OP_CASES = [(8, 2048), (32, 512), (2, 8192), (16, 8192)]  # (B, T) at H = 12, D = 64, bf16
MODEL_CASES = [(8, 2048), (32, 512)]  # (B, T) of the 125M training steps
REFERENCE_MAX_TOKENS = 16384  # the reference under autograd takes seconds per step past B * T of this
CHECK_CASES = [(2, 4, 333, 32), (2, 4, 333, 64), (1, 4, 200, 128)]  # (B, H, T, D), partial last mini-batch
TOL = {"float32": 1e-5, "bfloat16": 1e-2}
DRY = {
    "op_cases": [(1, 40)],
    "model_cases": [(1, 32)],
    "check_cases": [(1, 2, 37, 16)],
    "H": 2,
    "D": 16,
    "byte_shape": dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, mini_batch_size=16),
}


def leaves(args: dict) -> dict:
    """Copies of the op's arguments that autograd tracks."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in args.items()}


def fwd_bwd(op, args: dict, **kw):
    """A function that runs op forward and backward (a random gradient on every output, so the
    final state's adjoint is exercised as in a streamed segment); returns the gradients."""
    inputs = leaves(args)
    with torch.no_grad():
        shapes = [o.shape for o in op(**inputs, **kw)]
    cotangents = [torch.randn(s, device=args["XQ"].device) for s in shapes]

    def run():
        outs = op(**inputs, **kw)
        return torch.autograd.grad(outs, list(inputs.values()), [c.to(o.dtype) for c, o in zip(cotangents, outs)])

    return run, inputs, cotangents


def saved_state_bytes(kind: str, B: int, H: int, T: int, D: int, b: int) -> int:
    """The float32 start states the training forward keeps for the backward (TTTLinearFunction,
    TTTMLPFunction): NC mini-batches' W, b; NC + 1 of W1, b1, W2, b2 for TTT-MLP."""
    NC = -(-T // b)
    if kind == "linear":
        return B * H * NC * (D * D + D) * 4
    F = 4 * D
    return B * H * (NC + 1) * (2 * D * F + F + D) * 4


def train_flops(B: int, H: int, T: int, D: int, b: int) -> int:
    """Matrix-product FLOPs of TTT-Linear's forward + backward as the fused schedule runs them,
    per token and head 22 D^2 + 16 b D: the forward's 6 D^2 + 4 b D (kernel_bench.counts.ttt_linear_flops);
    in the backward eight [b, D] x [D, D] products (x_k W and x_q W recomputed, dz W^T, x_k dW',
    (e_last grad) dW'^T, dz1 W^T, x_q^T dz, x_k^T dz1) and six b x b blocks (x_q x_k^T and
    (e * A) grad recomputed, dz grad^T, (dM * e) x_k, its transpose with x_q, M^T dz)."""
    return B * H * T * (22 * D * D + 16 * b * D)


def train_bytes(B: int, H: int, T: int, D: int, b: int, elt: int) -> dict[str, int]:
    """Bytes of TTT-Linear's forward + backward. floor: what any implementation must move (read
    XQ, XK, XV, eta twice and dZ once, write Z, dXQ, dXK, dXV, d eta: (12 D + 3) per token and
    head); as_run: the floor plus the float32 start states ours writes in the forward and reads
    in the backward (2 * 4 (D^2 + D) / b per token and head; the split schedule moves more)."""
    floor = B * H * T * (12 * D + 3) * elt
    return {"floor": floor, "as_run": floor + saved_state_bytes("linear", B, H, T, D, b) * 2}


def backward_roofline(B: int, H: int, T: int, D: int, b: int, peaks: dict, ms: float) -> dict:
    """kernel_bench.counts.roofline of one forward + backward (bf16 matmul peak, device-copy bandwidth),
    for the floor's bytes and for those as run, and the time per step of the sequential chain."""
    flops, nbytes = train_flops(B, H, T, D, b), train_bytes(B, H, T, D, b, 2)
    peak_flops, peak_bytes = peaks["bf16_matmul_tflops"] * 1e12, peaks["copy_gbps"] * 1e9
    return {
        "floor": counts.roofline(flops, nbytes["floor"], peak_flops, peak_bytes, ms),
        "as_run": counts.roofline(flops, nbytes["as_run"], peak_flops, peak_bytes, ms),
        "us_per_mini_batch": ms * 1e3 / -(-T // b),
    }


# ---------------------------------------------------------------- sections


def gradients(run: Runner, cases: list) -> list[dict]:
    """Every gradient of both training kernels against autograd through the float64 reference,
    on fresh random inputs, float32 and bfloat16 (state, LN and token_idx float32 as in a layer)."""
    from ttt_helpers import ops
    from ttt_helpers.kernels import ttt_linear_train, ttt_mlp_train

    rows = []
    dtypes = (torch.float32, torch.bfloat16) if run.cuda else (torch.float32,)
    for kind, train, reference, make in (
        ("linear split", partial(ttt_linear_train, schedule="split"), ops.ttt_linear, inputs.ttt_inputs),
        ("linear fused", partial(ttt_linear_train, schedule="fused"), ops.ttt_linear, inputs.ttt_inputs),
        ("mlp", ttt_mlp_train, ops.ttt_mlp, inputs.mlp_inputs),
    ):
        for dtype in dtypes:
            for B, H, T, D in cases:
                name = str(dtype).removeprefix("torch.")
                row = {"kind": kind, "dtype": name, "B": B, "H": H, "T": T, "D": D, "tolerance": TOL[name]}

                def check():
                    args = make(B, H, T, D, dtype, device=run.device)
                    args["token_idx"] = ops.default_token_idx(MB, device=run.device)
                    fn, tracked, cot = fwd_bwd(train, args)
                    got = fn()
                    ref_inputs = leaves(inputs.to64(args))
                    outs = reference(**ref_inputs)
                    want = torch.autograd.grad(outs, list(ref_inputs.values()), [c.double() for c in cot])
                    return {k: rel_err(g, w) for k, g, w in zip(tracked, got, want)}

                errs = run.attempt(row, "rel_err", check)
                row["ok"] = bool(errs) and max(errs.values()) < row["tolerance"]
                rows.append(row)
                worst = max(errs.values()) if errs else None
                print(f"  {kind} {name} B={B} H={H} T={T} D={D}: worst {worst} ok={row['ok']}", flush=True)
    return rows


def fla_fwd_bwd(chunk_ttt_linear: Callable, args: dict) -> Callable[[], tuple]:
    """fla's chunk_ttt_linear forward and backward on our inputs ([B, T, H, D], eta [B, T, H, 1]),
    every input a leaf: a function to time."""
    a = leaves(
        {
            **{n: args[n].transpose(1, 2).contiguous() for n in ("XQ", "XK", "XV")},
            "eta": args["eta"].transpose(1, 2).unsqueeze(-1).contiguous(),
            **{n: args[n] for n in ("ln_weight", "ln_bias", "W0", "b0")},
        }
    )

    def fla():
        o, *_ = chunk_ttt_linear(
            a["XQ"], a["XK"], a["XV"], a["ln_weight"], a["ln_bias"], a["eta"],
            initial_state=a["W0"], initial_state_bias=a["b0"], output_final_state=True, chunk_size=16,
        )  # fmt: skip
        return torch.autograd.grad(o, list(a.values()), torch.ones_like(o), allow_unused=True)

    return fla


def sdpa_fwd_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """Causal scaled_dot_product_attention forward and backward: the gradients of q, k, v. [B, H, T, D]"""
    import torch.nn.functional as F

    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return torch.autograd.grad(o, (q, k, v), torch.ones_like(o))


def op_level(run: Runner, cases: list, H: int, D: int, peaks: dict | None) -> list[dict]:
    """Forward + backward of one TTT-Linear op, bf16 inputs and a float32 state: ours under both
    schedules (and which one "auto" picks), fla's chunk_ttt_linear, causal SDPA on the same
    B, H, T, D, the reference under autograd; the roofline of ours."""
    from ttt_helpers import ops
    from ttt_helpers.kernels import ttt_linear_train
    from ttt_helpers.kernels.common import training_schedule

    try:
        from fla.ops.ttt import chunk_ttt_linear
    except ImportError as exc:
        chunk_ttt_linear, fla_missing = None, f"not installed ({exc})"

    rows = []
    for B, T in cases:
        row = {"B": B, "T": T, "H": H, "D": D, "dtype": "bfloat16", "state_dtype": "float32", "mini_batch_size": 16}
        print(f"op B={B} T={T}", flush=True)
        args = inputs.ttt_inputs(B, H, T, D, torch.bfloat16, device=run.device)
        row["ours_schedule"] = training_schedule("auto", args["XQ"])
        for schedule in ("split", "fused"):
            train = partial(ttt_linear_train, schedule=schedule)
            ours, _, _ = fwd_bwd(train, args)
            run.attempt(row, f"ours_{schedule}_fwd_bwd_ms", lambda: run.fast_ms(ours))
            with torch.no_grad():
                run.attempt(row, f"ours_{schedule}_fwd_ms", lambda: run.fast_ms(lambda: train(**args)))
            del ours
        for key in ("fwd_bwd_ms", "fwd_ms"):  # what ttt_linear_train runs by default
            row[f"ours_{key}"] = row.get(f"ours_{row['ours_schedule']}_{key}")
        row["saved_states_MiB"] = saved_state_bytes("linear", B, H, T, D, 16) / 2**20
        if peaks and isinstance(row["ours_fwd_bwd_ms"], float):
            row["roofline"] = backward_roofline(B, H, T, D, 16, peaks, row["ours_fwd_bwd_ms"])
        if chunk_ttt_linear is None:
            row["fla_chunk_fwd_bwd_ms"] = fla_missing
        else:
            run.attempt(row, "fla_chunk_fwd_bwd_ms", lambda: run.fast_ms(fla_fwd_bwd(chunk_ttt_linear, args)))
        q, k, v = (args[n].detach().clone().requires_grad_(True) for n in ("XQ", "XK", "XV"))
        run.attempt(row, "sdpa_causal_fwd_bwd_ms", lambda: run.fast_ms(lambda: sdpa_fwd_bwd(q, k, v)))
        del q, k, v
        if B * T <= REFERENCE_MAX_TOKENS:  # the reference wants one dtype: a bf16 state here
            ref, _, _ = fwd_bwd(ops.ttt_linear, {**args, "W0": args["W0"].bfloat16(), "b0": args["b0"].bfloat16()})
            run.attempt(row, "reference_fwd_bwd_ms", lambda: run.slow_ms(ref, repeats=1))
            del ref
        else:
            row["reference_fwd_bwd_ms"] = f"skipped: B*T > {REFERENCE_MAX_TOKENS}"
        rows.append(row)
        del args
        if run.cuda:
            torch.cuda.empty_cache()
        print("  " + ", ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return rows


def mlp_op_level(run: Runner, cases: list, H: int, D: int) -> list[dict]:
    """Forward + backward of one TTT-MLP op (F = 4D), bf16 inputs and a float32 state, against the
    reference under autograd."""
    from ttt_helpers import ops
    from ttt_helpers.kernels import ttt_mlp_train

    rows = []
    for B, T in cases:
        row = {"B": B, "T": T, "H": H, "D": D, "F": 4 * D, "dtype": "bfloat16", "state_dtype": "float32"}
        print(f"mlp op B={B} T={T}", flush=True)
        args = inputs.mlp_inputs(B, H, T, D, torch.bfloat16, device=run.device)
        row["saved_states_MiB"] = saved_state_bytes("mlp", B, H, T, D, 16) / 2**20
        ours, _, _ = fwd_bwd(ttt_mlp_train, args)
        run.attempt(row, "ours_fwd_bwd_ms", lambda: run.fast_ms(ours))
        del ours
        with torch.no_grad():
            run.attempt(row, "ours_fwd_ms", lambda: run.fast_ms(lambda: ttt_mlp_train(**args)))
        if B * T <= REFERENCE_MAX_TOKENS:
            ref_args = {k: (v.bfloat16() if k in inputs.MLP_PARAMS else v) for k, v in args.items()}
            ref, _, _ = fwd_bwd(ops.ttt_mlp, ref_args)
            run.attempt(row, "reference_fwd_bwd_ms", lambda: run.slow_ms(ref, repeats=1))
            del ref, ref_args
        else:
            row["reference_fwd_bwd_ms"] = f"skipped: B*T > {REFERENCE_MAX_TOKENS}"
        rows.append(row)
        del args
        if run.cuda:
            torch.cuda.empty_cache()
        print("  " + ", ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return rows


def training_model(name: str, preset: dict, vocab_size: int) -> torch.nn.Module:
    """A new model of the preset's shape: "ttt_linear", "ttt_mlp" (ttt_impl='kernel') or "llama_sdpa",
    and any of them with "_compiled" (under torch.compile: what a user who wants speed trains)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ttt_helpers.model import TTTConfig, TTTForCausalLM

    if name.endswith("_compiled"):
        return torch.compile(training_model(name.removesuffix("_compiled"), preset, vocab_size))
    if name == "llama_sdpa":
        config = LlamaConfig(
            **preset,
            num_key_value_heads=preset["num_attention_heads"],
            vocab_size=vocab_size,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
        return LlamaForCausalLM(config)
    kind = name.removeprefix("ttt_")
    return TTTForCausalLM(TTTConfig(**preset, vocab_size=vocab_size, ttt_layer_type=kind, ttt_impl="kernel"))


def model_training(run: Runner, cases: list, preset: dict, vocab_size: int) -> dict:
    """Training tokens/s of one step (forward, backward, AdamW) under bf16 autocast, float32
    weights: the TTT-Linear and TTT-MLP models (ttt_impl='kernel') and a same-size Llama (SDPA)."""
    result = {
        "note": "one optimizer step: forward with labels, backward, AdamW; float32 weights, bf16 autocast; "
        "median of 3 timed steps after one warm-up step; peak_memory_GiB is torch.cuda.max_memory_allocated "
        "over those steps. The TTT layers run ttt_impl='kernel' (the training kernels); *_compiled is the same "
        "model under torch.compile (compiled in the warm-up step, which is not timed), at the first shape only; in "
        "the TTT model the kernels' launches stay eager (torch.compiler.disable) and the rest is compiled around them.",
        "steps": [],
    }
    for name in ("ttt_linear", "ttt_linear_compiled", "ttt_mlp", "llama_sdpa", "llama_sdpa_compiled"):
        torch.manual_seed(0)
        model = training_model(name, preset, vocab_size).to(run.device).train()
        result.setdefault("params_M", {})[name] = sum(p.numel() for p in model.parameters()) / 1e6
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for B, T in cases[:1] if name.endswith("_compiled") else cases:  # compiling again per shape costs minutes
            row = next((r for r in result["steps"] if (r["B"], r["T"]) == (B, T)), None)
            if row is None:
                row = {"B": B, "T": T}
                result["steps"].append(row)
            ids = torch.randint(0, vocab_size, (B, T), device=run.device)

            def step():
                with torch.autocast(run.device, dtype=torch.bfloat16):
                    loss = model(ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            if run.cuda:
                torch.cuda.reset_peak_memory_stats()
            ms = run.attempt(row, f"{name}_ms", lambda: run.slow_ms(step, repeats=3 if run.cuda else 1))
            if ms is not None:
                row[f"{name}_tokens_per_s"] = B * T / ms * 1e3
                if run.cuda:
                    row[f"{name}_peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            print(f"  {name} B={B} T={T}: {row.get(f'{name}_tokens_per_s')} tokens/s", flush=True)
        del model, optimizer
        if run.cuda:
            torch.cuda.empty_cache()
    return result


def byte_level_training(run: Runner, shape: dict, batch_size: int, window: int, reference: bool) -> dict:
    """Training tokens/s of chapter 5's byte-level TTT-Linear (train_gpu.py's shape, batch and
    window; built by ttt_helpers.train.build_model): one step, forward with labels, backward,
    AdamW, float32 weights, through the kernels under bf16 autocast and through the reference ops
    in float32 (they take one dtype for activations and state, which autocast would mix)."""
    from ttt_helpers.train import TrainConfig, build_model

    config = TrainConfig(model="ttt-linear", tokenizer="bytes", window=window, batch_size=batch_size, **shape)
    row = {"shape": shape, "B": batch_size, "T": window, "target_tokens_per_s": 250_000}
    row["note"] = "kernel: bf16 autocast, ttt_impl='kernel'; reference: float32, ttt_impl='reference'"
    ids = torch.randint(0, 256, (batch_size, window), device=run.device)
    for impl in ("kernel", "reference") if reference else ("kernel",):
        model = build_model(config, vocab_size=256).to(run.device).train()
        model.set_ttt_impl(impl)
        row["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            with torch.autocast(run.device, dtype=torch.bfloat16, enabled=impl == "kernel"):
                loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        ms = run.attempt(row, f"{impl}_ms", lambda: run.slow_ms(step, repeats=5 if run.cuda else 1))
        if ms is not None:
            row[f"{impl}_tokens_per_s"] = batch_size * window / ms * 1e3
        print(f"  TTT-Linear 25M bytes, {impl}: {row.get(f'{impl}_tokens_per_s')} tokens/s", flush=True)
        del model, optimizer
    return row


SECTIONS = ("gradients", "op_fwd_bwd", "mlp_op_fwd_bwd", "model_training", "byte_level_25m")


def kept_sections(out: Path, prov: dict, only: tuple[str, ...]) -> dict:
    """The sections of an earlier run in `out` that this one does not run again, with their
    provenance; {} without a file. A file written on another GPU is refused, before any work."""
    if not out.exists():
        return {}
    earlier = json.loads(out.read_text())
    if earlier.get("provenance", {}).get("gpu") != prov["gpu"]:
        raise SystemExit(
            f"{out} holds a run on {earlier.get('provenance', {}).get('gpu')}, not {prov['gpu']}: give another --out"
        )
    kept = {name: earlier[name] for name in SECTIONS if name in earlier and name not in only}
    sections = earlier.get("section_provenance", {})
    return kept | {"section_provenance": {name: sections[name] for name in kept if name in sections}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/backward_<gpu>.json)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes: checks the script's logic in seconds")
    parser.add_argument(
        "--only", default=None, help=f"comma-separated sections (default all: {', '.join(SECTIONS)}); the others "
        "already in --out are kept, so a run can go on over several calls on one GPU"
    )  # fmt: skip
    args = parser.parse_args(argv)
    only = SECTIONS if args.only is None else tuple(s.strip() for s in args.only.split(",") if s.strip())
    if not only or any(s not in SECTIONS for s in only):
        parser.error(f"--only must name some of {', '.join(SECTIONS)}, got {args.only!r}")
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("bench_backward.py needs a CUDA GPU; without one, --dry-run runs it tiny on the CPU")
    run = Runner("cuda" if cuda else "cpu")
    started = time.perf_counter()
    prov = timing.provenance() if cuda else timing.dry_provenance()
    dry_out = Path(tempfile.gettempdir()) / "bench_backward_dry_run.json"  # a dry run's numbers are no result
    out = args.out or (dry_out if args.dry_run else timing.results_path("backward", prov))
    results = kept_sections(out, prov, only)
    results |= {"provenance": prov, "fla_note": FLA_NOTE, "dry_run": args.dry_run}
    results.setdefault("section_provenance", {})
    results["reference_max_tokens"] = (
        f"the reference under autograd is timed only where B * T <= {REFERENCE_MAX_TOKENS} "
        "(one step after a warm-up); larger cases record 'skipped'"
    )
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - started
        out.write_text(json.dumps(results, indent=1) + "\n")

    from ttt_helpers.model import TTT_STANDARD_CONFIGS

    if args.dry_run:
        heads, dim = DRY["H"], DRY["D"]
        op_cases, model_cases, check_cases = DRY["op_cases"], DRY["model_cases"], DRY["check_cases"]
        preset = dict(hidden_size=heads * dim, intermediate_size=64, num_hidden_layers=1, num_attention_heads=heads)
        vocab = 64
    else:
        heads, dim, op_cases, model_cases, check_cases = H, D, OP_CASES, MODEL_CASES, CHECK_CASES
        preset, vocab = TTT_STANDARD_CONFIGS["125m"], 32000
    if args.dry_run:
        byte_shape, byte_batch, byte_window = dict(DRY["byte_shape"]), 2, 32
    else:  # chapter 5's byte-level shape, batch and window
        byte_shape, byte_batch, byte_window = dict(SHAPE), COMMON["batch_size"], WINDOW
    print(f"{results['provenance']['gpu']}: writing {out}", flush=True)
    peaks = None
    if cuda:
        results["peaks"] = peaks = timing.measure_peaks(run)
    sections = [
        ("gradients", lambda: gradients(run, check_cases)),
        ("op_fwd_bwd", lambda: op_level(run, op_cases, heads, dim, peaks)),
        ("mlp_op_fwd_bwd", lambda: mlp_op_level(run, op_cases, heads, dim)),
        ("model_training", lambda: model_training(run, model_cases, preset, vocab)),
        ("byte_level_25m", lambda: byte_level_training(run, byte_shape, byte_batch, byte_window, reference=True)),
    ]
    for name, section in sections:
        if name not in only:
            continue
        print(f"== {name}", flush=True)
        run.attempt(results, name, section)
        results["section_provenance"][name] = prov
        save()
    print(f"wrote {out} in {results['elapsed_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
