"""Benchmark the TTT Triton kernels and the models built on them on one GPU, and write the JSON.

    python -m benchmarks.bench_kernels                      # every section
    python -m benchmarks.bench_kernels --only step,model_decode  # some sections, the others kept in --out
    python -m benchmarks.bench_kernels --dry-run            # tiny shapes on the CPU (Triton's interpreter)

Sections (benchmarks/kernel_bench, one module each): correctness, op, decode, precision (TTT-Linear
op), mlp_correctness, mlp_op, mlp_decode (TTT-MLP op), mlp_state (TTT-MLP's state streamed or on
chip), step (the single-sequence bound), model_prefill, model_decode, mlp_model (the 125M models
against a Llama). Writes benchmarks/results/kernels_<gpu>.json after
every section, so a run cut short keeps what it measured; a case that fails records its error
and the run goes on. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

SECTIONS = (
    "correctness", "op", "decode", "precision", "mlp_correctness", "mlp_op", "mlp_decode", "mlp_state", "step",
    "model_prefill", "model_decode", "mlp_model",
)  # fmt: skip


def parse_sections(text: str | None) -> tuple[str, ...]:
    """'a,b' -> ("a", "b"), each checked against SECTIONS; None -> all of them."""
    if text is None:
        return SECTIONS
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise SystemExit(f"--only: unknown section(s) {unknown or text!r}; choose from {', '.join(SECTIONS)}")
    return names


def parse_lengths(text: str) -> tuple[int, ...]:
    """'2048,8192' -> (2048, 8192): positive token counts."""
    try:
        lengths = tuple(int(s) for s in text.split(","))
    except ValueError:
        lengths = ()
    if not lengths or min(lengths) < 1:
        raise SystemExit(f"--decode-contexts: expected positive token counts separated by commas, got {text!r}")
    return lengths


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help=f"comma-separated sections (default all: {', '.join(SECTIONS)})")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/kernels_<gpu>.json)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU through Triton's interpreter")
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the random inputs (default: a fresh one, recorded)"
    )
    parser.add_argument(
        "--decode-contexts", default=None, help="model_decode's prompt lengths, e.g. 2048,8192 (default all)"
    )
    return parser.parse_args(argv)


def section_runs(run, scale, peaks: dict, prov: dict, keep: Callable[[str], Callable[[dict], None]]) -> dict:
    """Each section's name and the call that measures it (`keep(name)`: a long section's progress)."""
    from benchmarks.kernel_bench import decode, mlp, mlp_state, model, op, precision, step

    clock = prov.get("sm_clock_max_mhz")
    clock_mhz = float(clock) if isinstance(clock, str) and clock.replace(".", "").isdigit() else None
    return {
        "correctness": lambda: op.correctness(run, scale),
        "op": lambda: op.op_level(run, scale, peaks),
        "decode": lambda: decode.decode(run, scale, peaks),
        "precision": lambda: precision.precision_variants(run, scale),
        "mlp_correctness": lambda: mlp.mlp_correctness(run, scale),
        "mlp_op": lambda: mlp.mlp_op_level(run, scale, peaks),
        "mlp_decode": lambda: mlp.mlp_decode(run, scale),
        "mlp_state": lambda: mlp_state.mlp_state(run, scale),
        "step": lambda: step.step_latency(run, scale, clock_mhz),
        "model_prefill": lambda: model.model_prefill(run, scale),
        "model_decode": lambda: model.model_decode(run, scale, peaks, progress=keep("model_decode")),
        "mlp_model": lambda: model.mlp_model_level(run, scale),
    }


def results_to_extend(out: Path, keep_others: bool) -> dict:
    """The JSON this run writes into: with keep_others, the sections of an existing `out` (those not
    rerun stay as they were); and the notes every run records."""
    from benchmarks.kernel_bench import op
    from ttt_helpers.kernels import common

    results = json.loads(out.read_text()) if keep_others and out.exists() else {}
    results.update(
        {"fla_note": op.FLA_NOTE, "kernel_dot_precisions_16bit": dict(zip(("W", "grad"), common.PRECISION_16BIT))}
    )
    results.setdefault("section_provenance", {})
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sections = parse_sections(args.only)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit(
            "bench_kernels needs a CUDA GPU (torch.cuda.is_available() is False); "
            "--dry-run runs its code on the CPU, and tests/test_kernels.py checks the kernels there"
        )
    from benchmarks.kernel_bench.inputs import dry_scale, full_scale
    from benchmarks.kernel_bench.timing import Runner, dry_provenance, measure_peaks, provenance, results_path

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)  # fresh inputs every run unless --seed repeats one; each section records it
    scale = dry_scale() if args.dry_run else full_scale()
    if args.decode_contexts is not None:
        scale = dataclasses.replace(scale, decode_contexts=parse_lengths(args.decode_contexts))
    run = Runner(scale.device)
    prov = {**(dry_provenance() if args.dry_run else provenance()), "seed": seed}
    out = args.out or results_path("kernels", prov)
    results = results_to_extend(out, keep_others=args.only is not None)
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - started
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(out)  # never a half-written file

    def keep(name: str):
        """A progress callback for a long section: store what it has so far, and save."""

        def store(result: dict) -> None:
            results[name] = result
            save()

        return store

    print(f"{prov['gpu']}: writing {out}", flush=True)
    results["provenance"] = prov
    results["peaks"] = peaks = measure_peaks(run)
    print(f"peaks: {peaks['bf16_matmul_tflops']:.0f} TFLOP/s bf16, {peaks['copy_gbps']:.0f} GB/s copy", flush=True)
    save()
    runs = section_runs(run, scale, peaks, prov, keep)
    for name in sections:
        print(f"== {name}", flush=True)
        section_started = time.perf_counter()
        run.attempt(results, name, runs[name])
        results["section_provenance"][name] = {**prov, "seconds": time.perf_counter() - section_started}
        save()
    print(f"wrote {out} in {results['elapsed_s']:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
