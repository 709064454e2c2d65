"""Train a ~25M-parameter byte-level TTT-Linear and a Transformer of the same shape on one GPU,
with the same data, steps and window, and write what the training chapter plots as JSON.

    python -m benchmarks.train_gpu --budget-s 420
    python -m benchmarks.train_gpu --steps 249 --only "TTT-Linear, no passing"   # add one run to the JSON
    python -m benchmarks.train_gpu --compare-impls 200   # the TTT-Linear run through the kernels and the reference

A short probe times a TTT-Linear step first; the number of steps is then chosen so that the
TTT runs fit the budget, and every run gets that same number of steps (equal tokens). Runs:
TTT-Linear with state passing, TTT-Linear without it, and the Transformer (a Llama with RoPE), all
under bf16 autocast, the TTT layers through the Triton training kernels. `--compare-impls N` instead
trains the TTT-Linear run N steps through the kernels and through the reference ops, from one seed.
After each run: length generalization from 0.5x to 10x the window (20 lengths), the loss by
position over windows of 10x the training window, and a sampled continuation. The JSON is
rewritten after every run, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.byte_level_runs import COMMON, SHAPE, WINDOW, byte_plays
from benchmarks.kernel_bench.timing import provenance, results_path
from ttt_helpers import metrics
from ttt_helpers.inference.generate import stream_generate
from ttt_helpers.train import TrainConfig, train

RUNS = {  # name: (model, state_passing)
    "TTT-Linear": ("ttt-linear", True),
    "Transformer": ("transformer", False),
    "TTT-Linear, no passing": ("ttt-linear", False),
}
PROMPT = "HAMLET\nTo be, or not to be, that is the question:\n"


def position_windows(val_docs: list[torch.Tensor], length: int, per_doc: int = 8) -> list[torch.Tensor]:
    """`per_doc` consecutive windows of `length` bytes from the middle of each held-out play."""
    return [doc[doc.numel() // 3 :][: per_doc * length] for doc in val_docs]


def step_seconds(train_docs: list[torch.Tensor], out_dir: Path) -> float:
    """Seconds per TTT-Linear training step, from the last 3 of 6 probe steps (after warm-up)."""
    stamps: list[float] = []
    config = TrainConfig(model="ttt-linear", max_steps=6, eval_after=False, out_dir=str(out_dir), **COMMON)
    train(config, train_docs=train_docs, callback=lambda step, record: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[-4]) / 3


def compare_impls(steps: int, train_docs: list[torch.Tensor], runs_dir: Path) -> dict:
    """The TTT-Linear run trained `steps` steps through the kernels and through the reference ops
    (ttt_impl "kernel" and "reference"), from the same seed on the same batches: both loss curves."""
    result: dict = {"steps": steps, "note": "bf16 autocast on both; the reference computes the TTT op in float32"}
    for impl in ("kernel", "reference"):
        config = TrainConfig(
            model="ttt-linear", max_steps=steps, eval_after=False, ttt_impl=impl, out_dir=str(runs_dir / impl), **COMMON
        )
        start = time.perf_counter()
        run = train(config, train_docs=train_docs)
        result[impl] = {
            "losses": [round(x, 5) for x in run.losses],
            "tokens_per_s": run.tokens / (time.perf_counter() - start),
        }
        print(
            f"{impl}: {steps} steps, last loss {run.losses[-1]:.4f}, {result[impl]['tokens_per_s']:,.0f} tok/s",
            flush=True,
        )
    diffs = [abs(a - b) for a, b in zip(result["kernel"]["losses"], result["reference"]["losses"])]
    result["max_abs_loss_difference"], result["mean_abs_loss_difference"] = max(diffs), sum(diffs) / len(diffs)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for the two TTT-Linear runs together")
    parser.add_argument("--max-steps", type=int, default=2000, help="never more steps than this")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/training_<gpu>.json)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (skips the probe)")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(RUNS),
        default=None,
        help="run only these (repeatable); their results replace those in an existing --out",
    )
    parser.add_argument("--runs-dir", type=Path, default=Path("/tmp/ttt-train-gpu"), help="run folders (logs)")
    parser.add_argument("--compare-impls", type=int, default=None, metavar="N", help="only the kernel/reference runs")
    return parser.parse_args(argv)


def length_generalization_record(lg: metrics.LengthGeneralization) -> dict:
    """A run's length generalization as the JSON holds it."""
    return {
        "train_window": lg.train_window,
        "rows": [dict(ratio=r.ratio, length=r.length, perplexity=r.perplexity, tokens=r.tokens) for r in lg.rows],
        "at_1x": lg.at_1x,
        "at_5x": lg.at_5x,
        "at_10x": lg.at_10x,
        "best_length": lg.best_length,
        "degradation": lg.degradation,
    }


def measured_run(
    name: str, steps: int, train_docs: list[torch.Tensor], val_docs: list[torch.Tensor], runs_dir: Path
) -> dict:
    """Train run `name` of RUNS for `steps` steps, then measure it: length generalization on the
    held-out plays' first bytes, the loss by position over windows of 10x the window, a sample."""
    model, passing = RUNS[name]
    config = TrainConfig(model=model, state_passing=passing, max_steps=steps, out_dir=str(runs_dir / name), **COMMON)
    eval_docs = [d[: COMMON["eval_tokens_per_doc"]] for d in val_docs]
    run_start = time.perf_counter()
    stamps: list[float] = []
    result = train(
        config,
        train_docs=train_docs,
        val_docs=eval_docs,
        callback=lambda step, record: stamps.append(time.perf_counter()),
    )
    train_s = stamps[-1] - run_start
    model_ = result.model
    device = next(model_.parameters()).device
    windows = [w.to(device) for w in position_windows(val_docs, 10 * WINDOW)]
    curve = metrics.per_position_loss(model_, windows, length=10 * WINDOW)
    generator = torch.Generator().manual_seed(0)
    sample = "".join(stream_generate(model_, None, PROMPT, 400, temperature=0.8, generator=generator))
    lg = result.length_generalization
    print(
        f"{name}: {result.step} steps, loss {sum(result.losses[-20:]) / 20:.3f} (last 20), "
        f"{result.tokens / train_s:,.0f} tok/s, perplexity at {lg.rows[0].length} {lg.rows[0].perplexity:.3f}, "
        f"at {lg.rows[-1].length} {lg.rows[-1].perplexity:.3f}",
        flush=True,
    )
    return {
        "model": model,
        "state_passing": passing,
        "parameters": sum(p.numel() for p in model_.parameters()),
        "steps": result.step,
        "tokens": result.tokens,
        "losses": [round(x, 5) for x in result.losses],
        "train_seconds": train_s,
        "tokens_per_s": result.tokens / train_s,
        "length_generalization": length_generalization_record(lg),
        "per_position_loss": {
            "length": 10 * WINDOW,
            "windows": 8 * len(windows),
            "bin": 64,
            "binned": curve.view(-1)[: (curve.numel() // 64) * 64].view(-1, 64).mean(1).tolist(),
        },
        "sample": {"prompt": PROMPT, "temperature": 0.8, "seed": 0, "text": sample},
        "seconds_with_eval": time.perf_counter() - run_start,
        "provenance": provenance(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("train_gpu needs a CUDA GPU; the CPU version of these runs is chapter 5")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    results: dict = {"provenance": provenance(), "shape": SHAPE, "common": COMMON, "runs": {}}
    out = args.out or results_path("training", results["provenance"])
    out.parent.mkdir(parents=True, exist_ok=True)
    if (args.only or args.compare_impls) and out.exists():
        results = json.loads(out.read_text())  # keep the other runs; each run records its own provenance

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - started
        out.write_text(json.dumps(results, indent=1) + "\n")

    train_docs, val_docs = byte_plays()
    if args.compare_impls:
        results["impl_comparison"] = {
            **compare_impls(args.compare_impls, train_docs, args.runs_dir),
            "provenance": provenance(),
        }
        save()
        print(f"wrote {out} in {time.perf_counter() - started:.0f} s", flush=True)
        return
    if args.steps is None:
        seconds = step_seconds(train_docs, args.runs_dir / "probe")
        steps = max(50, min(args.max_steps, int(args.budget_s / 2 / seconds)))
        results["probe"] = {"ttt_linear_step_s": seconds, "steps": steps, "budget_s": args.budget_s}
        print(f"TTT-Linear step {seconds:.3f} s -> {steps} steps per run", flush=True)
    else:
        steps = args.steps
    results["tokens_per_run"] = steps * COMMON["batch_size"] * WINDOW
    save()
    for name in RUNS:
        if args.only and name not in args.only:
            continue
        results["runs"][name] = measured_run(name, steps, train_docs, val_docs, args.runs_dir)
        save()
        torch.cuda.empty_cache()
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
