"""How far the kernel path of a TTT model is from its reference path, at every time step.

    python -m benchmarks.model_distances --train-steps 120
    python -m benchmarks.model_distances --layer-type mlp --train-steps 40
    python -m benchmarks.model_distances --checkpoint MODEL --corpus CORPUS   # a trained 125M model, fp16 and bf16

Trains the byte-level TTT-Linear (or TTT-MLP) of `train_gpu.py` briefly (so that its predictions are not
near-uniform, as a random model's are), then feeds the same held-out text through the model
twice, with `ttt_impl="kernel"` and with `ttt_impl="reference"`, in bfloat16 and in float32:
a prefill of [B=32, T=512], then 512 decode steps of one token per sequence (teacher forced:
both paths read the same tokens). At every position it records the total variation distance,
the max-abs probability difference and the percentage of sequences whose argmax differs
(`ttt_helpers.metrics`). Writes benchmarks/results/model_distances_<gpu>.json
(model_distances_mlp_<gpu>.json for TTT-MLP). With --checkpoint, the model is a saved TTTForCausalLM
(train_long.py --save-model), the passages come from the corpus's held-out English and code, and
the dtypes are float16 and bfloat16 (model_distances_125m_<gpu>.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.byte_level_runs import COMMON, byte_plays
from benchmarks.kernel_bench.timing import provenance, results_path
from ttt_helpers import metrics
from ttt_helpers.compat import output_cache
from ttt_helpers.train import TrainConfig, train

B, PREFILL, DECODE = 32, 512, 512


@torch.no_grad()
def logits_by_step(model: torch.nn.Module, ids: torch.Tensor, impl: str) -> torch.Tensor:
    """Prefill ids[:, :PREFILL], then decode the rest token by token. -> [B, T, V] float32 logits"""
    model.set_ttt_impl(impl)
    out = model(ids[:, :PREFILL], use_cache=True)
    cache, pieces = output_cache(out), [out.logits.float()]
    for t in range(PREFILL, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits.float())
    return torch.cat(pieces, dim=1)


def heldout_passages(corpus_dir: Path, rows: int, length: int) -> torch.Tensor:
    """`rows` passages of `length` tokens, half from the held-out English and half from the
    held-out code, evenly spaced through each: [rows, length] int64."""
    import numpy as np

    from ttt_helpers.data.store import load_corpus
    from ttt_helpers.train.windows import corpus_stream

    corpus = load_corpus(corpus_dir)
    passages = []
    for kind in ("english", "code"):
        tokens = corpus_stream(corpus, "heldout", kind)
        spacing = (tokens.size - length) // (rows // 2)
        passages += [tokens[k * spacing : k * spacing + length] for k in range(rows // 2)]
    return torch.from_numpy(np.stack(passages))


def compare(p: torch.Tensor, q: torch.Tensor) -> dict:
    """Per position (over the B sequences): mean total variation, max of max-abs, % argmax differing."""
    tv = metrics.total_variation(p.flatten(0, 1), q.flatten(0, 1)).view(p.shape[:2])
    mad = metrics.max_abs_diff(p.flatten(0, 1), q.flatten(0, 1)).view(p.shape[:2])
    differ = (p.argmax(-1) != q.argmax(-1)).float()
    return {
        "tv_mean": tv.mean(0).tolist(),
        "max_abs_diff_max": mad.amax(0).tolist(),
        "argmax_differ_pct": (100 * differ.mean(0)).tolist(),
        "summary": {
            "prefill": {
                "tv_mean": tv[:, :PREFILL].mean().item(),
                "argmax_differ_pct": 100 * differ[:, :PREFILL].mean().item(),
            },
            "decode": {
                "tv_mean": tv[:, PREFILL:].mean().item(),
                "argmax_differ_pct": 100 * differ[:, PREFILL:].mean().item(),
            },
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=120, help="training steps before the comparison")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/model_distances_<gpu>.json)")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to try the script: slow)")
    parser.add_argument("--layer-type", choices=("linear", "mlp"), default="linear", help="the TTT layers' inner model")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="a saved TTTForCausalLM folder instead of training"
    )
    parser.add_argument(
        "--corpus", type=Path, default=None, help="with --checkpoint: the corpus folder for its passages"
    )
    args = parser.parse_args(argv)
    if args.checkpoint is not None and (args.corpus is None or not (args.checkpoint / "config.json").is_file()):
        parser.error("--checkpoint needs a folder with config.json and safetensors weights, and --corpus")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("model_distances.py needs a CUDA GPU")
    started = time.perf_counter()
    prov = provenance() if args.device == "cuda" else {"gpu": "cpu"}
    if args.checkpoint is not None:
        return main_checkpoint(args, prov, started)
    out = args.out or results_path("model_distances" + ("_mlp" if args.layer_type == "mlp" else ""), prov)
    train_docs, val_docs = byte_plays()
    config = TrainConfig(
        model=f"ttt-{args.layer_type}",
        state_passing=True,
        max_steps=args.train_steps,
        eval_after=False,
        device=args.device,
        out_dir="/tmp/ttt-distances",
        **{**COMMON, "warmup_steps": min(COMMON["warmup_steps"], args.train_steps // 4)},
    )
    model = train(config, train_docs=train_docs).model.eval()
    # B held-out passages of PREFILL + DECODE bytes, from the middle of the four validation plays
    per_doc = B // len(val_docs)
    n = PREFILL + DECODE
    rows = [doc[doc.numel() // 3 + k * n :][:n] for doc in val_docs for k in range(per_doc)]
    ids = torch.stack(rows).to(args.device)
    model_info = {
        "layer_type": args.layer_type,
        "train_steps": args.train_steps,
        "shape": {k: COMMON[k] for k in ("hidden_size", "num_layers")},
    }
    results = new_results(prov, model_info, "both paths read the same held-out bytes")
    by_dtype(model, ids, (torch.bfloat16, torch.float32), results)
    write(results, out, started)


def new_results(prov: dict, model_info: dict, passages: str) -> dict:
    """The result's header, and an empty by_dtype for `by_dtype` to fill."""
    return {
        "provenance": prov,
        "model": model_info,
        "B": B,
        "prefill": PREFILL,
        "decode": DECODE,
        "note": f"teacher-forced: {passages}; position i < prefill comes from the prefill, the rest from "
        "single-token decode steps",
        "by_dtype": {},
    }


def by_dtype(model: torch.nn.Module, ids: torch.Tensor, dtypes: tuple, results: dict) -> None:
    """results["by_dtype"][name]: the kernel path against the reference path with the model in each dtype."""
    for dtype in dtypes:
        model = model.to(dtype)
        kernel = logits_by_step(model, ids, "kernel")
        reference = logits_by_step(model, ids, "reference")
        name = str(dtype).removeprefix("torch.")
        results["by_dtype"][name] = compare(reference, kernel)
        print(f"{dtype}: {results['by_dtype'][name]['summary']}", flush=True)


def write(results: dict, out: Path, started: float) -> None:
    results["elapsed_s"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results) + "\n")
    print(f"wrote {out} in {results['elapsed_s']:.0f} s", flush=True)


def main_checkpoint(args, prov: dict, started: float) -> None:
    """The comparison on a saved model and held-out corpus passages, in float16 and bfloat16."""
    from ttt_helpers.model import TTTForCausalLM

    out = args.out or results_path("model_distances_125m", prov)
    model = TTTForCausalLM.from_pretrained(args.checkpoint).to(args.device).eval()
    ids = heldout_passages(args.corpus, B, PREFILL + DECODE).to(args.device)
    config = model.config
    model_info = {
        "checkpoint": str(args.checkpoint),
        "layer_type": config.ttt_layer_type,
        "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "shape": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")},
    }
    passages = "held-out corpus passages (half English, half code); both paths run the whole model in the dtype"
    results = new_results(prov, model_info, passages)
    by_dtype(model, ids, (torch.float16, torch.bfloat16), results)
    write(results, out, started)


if __name__ == "__main__":
    main()
