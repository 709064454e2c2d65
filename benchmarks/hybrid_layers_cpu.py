"""One layer imitating its attention on the CPU: a converted TTT-Linear layer against a hybrid one.

    python -m benchmarks.hybrid_layers_cpu --out benchmarks/results/hybrid_layers_cpu.json [--layers 2,14,26]

SmolLM2's attention inputs and outputs are recorded on 16 windows of 1,024 tokens drawn from the
distillation bank (12 to train on, 4 held out). For each chosen layer, two students learn to give
the attention's output from its input with AdamW (`transplant.imitate`: lr 1e-3, 2 windows a step), training only the TTT
layer's own parameters: the TTT-Linear layer of `from_llama` (its output scaled first, as the
distillation does) and the hybrid layer of `from_llama(attention_window=64, attention_sinks=4)`,
whose TTT branch starts silent. The error is the squared error relative to the output's mean
square on the held-out windows, before and after.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.kernel_bench.timing import git_commit
from ttt_helpers.distill.bank import load_bank
from ttt_helpers.distill.loop import TTT_PARAMETERS
from ttt_helpers.model.convert import from_llama
from ttt_helpers.pretrained import load_pretrained
from ttt_helpers.transplant import imitate, match_scale, record_attention

WEIGHTS = {"code": 0.45, "kjv": 0.15, "pydocs": 0.25, "chat": 0.15}


def relative_error(layer, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return ((layer(x)[0] - y).pow(2).mean() / y.pow(2).mean()).item()


def train(layer, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """`transplant.imitate` on the layer's own TTT parameters only, 2 random rows of x, y [N, T, C] a step."""
    for name, p in layer.named_parameters():
        p.requires_grad_(name in TTT_PARAMETERS)
    imitate(layer, x, y, steps=steps, batch_size=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bank", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", default="2,14,26")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = [int(i) for i in args.layers.split(",")]
    llama, _ = load_pretrained()
    ids = load_bank(args.bank).sample(np.random.default_rng(0), 16, 1024, WEIGHTS)
    records: dict[int, list] = {}
    for s in range(0, 16, 4):
        for i, pair in record_attention(llama, layers, ids[s : s + 4]).items():
            records.setdefault(i, []).append(pair)
    students = {"ttt": from_llama(llama), "hybrid": from_llama(llama, attention_window=64, attention_sinks=4)}
    results = {"steps": args.steps, "tokens": 1024, "windows": {"train": 12, "held_out": 4}, "layers": {}}
    for i in layers:
        x, y = (torch.cat([pair[k] for pair in records[i]]) for k in (0, 1))
        for name, model in students.items():
            model.set_ttt_impl("reference")
            layer = model.model.layers[i].ttt
            if name == "ttt":
                match_scale(layer, x[:2], y[:2])
            t0 = time.perf_counter()
            before = relative_error(layer, x[12:], y[12:])
            train(layer, x[:12], y[:12], args.steps)
            after = relative_error(layer, x[12:], y[12:])
            results["layers"].setdefault(str(i), {})[name] = {"before": before, "after": after}
            print(f"layer {i} {name:6} relative error {before:.3f} -> {after:.3f} ({time.perf_counter() - t0:.0f} s)")
    results["environment"] = {"torch": torch.__version__, "commit": git_commit(), "threads": torch.get_num_threads()}
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
