"""How fast the paper's models train: tokens per second and peak memory of whole optimizer steps,
TTT against a Llama and flash-linear-attention's DeltaNets, every model on the same loss.

    python3 -m benchmarks.train_speed                    # every cell on a GPU; a later call resumes
    python3 -m benchmarks.train_speed --max-minutes 8    # start no cell after 8 minutes
    python3 -m benchmarks.train_speed --dry-run          # tiny shapes on the CPU

A cell is one model (`benchmarks.language_models`, the 125M shape), eager or compiled, at one
(batch, context): (8, 2048) and (2, 8192) by default. Each trains on random tokens (speed does not
depend on them) under bf16 autocast with AdamW, on `ttt_helpers.train.loss.causal_lm_loss`: the
model up to its final norm, then the head's cross-entropy 4,096 tokens at a time, so no model holds
[tokens, vocabulary] logits. "compiled" compiles the model's decoder (`torch.compile(model.model)`),
the loss stays eager. A cell runs --warmup steps (compiling, tuning), then --steps timed steps:
tokens/s = B * T * steps / their seconds, and the peak of allocated memory over those steps.

The JSON (default benchmarks/results/train_speed_<gpu>.json) is rewritten after every cell; a
cell already in it is skipped, so a run cut short goes on from where it stopped. A cell that fails
(out of memory, fla missing) records why.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

import torch

from benchmarks.kernel_bench.timing import dry_provenance, provenance, results_path
from benchmarks.language_models import ARCHITECTURES, DRY_SHAPE, VOCAB, build
from ttt_helpers.model import TTT_STANDARD_CONFIGS
from ttt_helpers.train.loss import causal_lm_loss

MODES = ("eager", "compiled")
SHAPES = ((8, 2048), (2, 8192))
DEFAULT_MODELS = ("llama", "ttt-linear", "ttt-linear-m", "ttt-mlp-m", "deltanet", "gated-deltanet")


def cell_name(model: str, mode: str, B: int, T: int) -> str:
    return f"{model} {mode} {B}x{T}"


def time_cell(model: torch.nn.Module, B: int, T: int, vocab: int, warmup: int, steps: int, device: str) -> dict:
    """Train `model` for warmup + steps optimizer steps on random [B, T] batches; the timed steps'
    tokens/s, seconds per step, peak memory and losses."""
    cuda = device == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> torch.Tensor:
        ids = torch.randint(0, vocab, (B, T), generator=gen, device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = causal_lm_loss(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    losses = [round(float(v), 4) for v in losses]
    if not all(torch.isfinite(torch.tensor(losses))):
        raise RuntimeError(f"the training loss is not finite: {losses}")
    return {
        "tokens_per_s": B * T * steps / seconds,
        "seconds_per_step": seconds / steps,
        "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "losses": losses,
    }


def run_cell(name: str, mode: str, B: int, T: int, args: argparse.Namespace, device: str) -> dict:
    """One cell, its failure recorded instead of raised."""
    shape = DRY_SHAPE if args.dry_run else TTT_STANDARD_CONFIGS["125m"]
    cell = {"model": name, "mode": mode, "B": B, "T": T, "warmup": args.warmup, "steps": args.steps}
    try:
        torch.manual_seed(0)
        model = build(name, shape, args.vocab, T).to(device).train()
        cell["parameters"] = sum(p.numel() for p in model.parameters())
        if mode == "compiled":
            model.model = torch.compile(model.model)
        start = time.perf_counter()
        cell |= time_cell(model, B, T, args.vocab, args.warmup, args.steps, device)
        cell["cell_seconds"] = time.perf_counter() - start
    except Exception as exc:  # one failing cell (memory, a missing package) must not stop the others
        cell["error"] = f"{type(exc).__name__}: {exc}".strip()[:2000]
        traceback.print_exc(limit=3)
    finally:
        model = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return cell


def shape_list(text: str) -> tuple[tuple[int, int], ...]:
    """'8x2048,2x8192' -> ((8, 2048), (2, 8192))."""
    try:
        shapes = tuple(tuple(int(n) for n in part.split("x")) for part in text.split(","))
    except ValueError:
        shapes = ()
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected BxT pairs separated by commas (8x2048,2x8192), got {text!r}")
    return shapes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of {ARCHITECTURES}")
    parser.add_argument("--modes", default=",".join(MODES), help="eager, compiled or both")
    parser.add_argument("--shapes", type=shape_list, default=SHAPES, help="BxT pairs, comma-separated")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiling, autotuning)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--max-minutes", type=float, default=None, help="start no cell after this many minutes")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default results/train_speed_<gpu>.json)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, eager only")
    args = parser.parse_args(argv)
    args.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    args.modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not args.models or any(m not in ARCHITECTURES for m in args.models):
        parser.error(f"--models must name some of {', '.join(ARCHITECTURES)}, got {args.models}")
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error(f"--modes must name some of {', '.join(MODES)}, got {args.modes}")
    if args.warmup < 0 or args.steps < 1:
        parser.error("--warmup must be >= 0 and --steps >= 1")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("a real run needs a CUDA GPU; --dry-run runs it tiny on the CPU")
    if args.dry_run:
        args.shapes, args.modes, args.vocab = ((2, 32),), ("eager",), 256
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        args.vocab = VOCAB
    return args


def save(out: Path, results: dict) -> None:
    """Rewrite the JSON atomically: never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".json.partial")
    partial.write_text(json.dumps(results, indent=1) + "\n")
    partial.replace(out)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    prov = dry_provenance() if args.dry_run else provenance()
    out = args.out or (Path("/tmp/train_speed_dry_run.json") if args.dry_run else results_path("train_speed", prov))
    results = json.loads(out.read_text()) if out.exists() else {"cells": {}, "visits": []}
    if results["visits"] and results["visits"][0]["gpu"] != prov["gpu"]:
        raise SystemExit(
            f"{out} holds cells timed on {results['visits'][0]['gpu']}, not {prov['gpu']}: give another --out"
        )
    results["visits"].append(prov)
    started = time.perf_counter()
    for B, T in args.shapes:
        for name in args.models:
            for mode in args.modes:
                key = cell_name(name, mode, B, T)
                if key in results["cells"]:
                    continue
                if args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes:
                    print(f"stopping after {args.max_minutes} minutes; a later call goes on", flush=True)
                    save(out, results)
                    return results
                print(f"{key} ...", flush=True)
                cell = run_cell(name, mode, B, T, args, device)
                cell["visit"] = len(results["visits"]) - 1
                results["cells"][key] = cell
                save(out, results)
                shown = cell.get("error") or f"{cell['tokens_per_s']:,.0f} tokens/s, {cell['peak_memory_GiB']} GiB"
                print(f"{key}: {shown}", flush=True)
    save(out, results)
    return results


if __name__ == "__main__":
    main()
