"""Our model against the authors' PyTorch model (ttt-lm-pytorch) on identical weights, in float64, on the CPU.

    git clone https://github.com/test-time-training/ttt-lm-pytorch /tmp/ttt-lm-pytorch   # cd831db
    python -m benchmarks.official_oracle_cpu --official /tmp/ttt-lm-pytorch/ttt.py \\
        --out benchmarks/results/official_oracle_cpu.json

Their `TTTForCausalLM` is built in float64 with their own initialisation, then every parameter is
moved by a seeded random amount (so norms, biases, gates and token_idx offsets are not at their
initial values), and `convert.from_official` makes ours from its state dict. Both read the same
token ids (2 rows of 45 tokens: two whole mini-batches of 16 and 13 more). Recorded: the largest
absolute difference of any logit, for TTT-Linear and TTT-MLP, mini-batch 1 and 16, each backbone;
their logits are their model body's output through their lm_head, since their forward casts the
logits to float32. For TTT-MLP the comparison is made again with their GELU derivative (written
with the rounded constants 0.79788456 and 0.1070322243) replaced by the exact one. Then both models
read the 45 tokens in pieces through their caches, and each piece's logits are compared with the
same model's single forward (or the error their cache raises is recorded).

Two changes let their code run on transformers 5; neither touches what it computes:
`_tied_weights_keys` becomes the dict that transformers 5 expects, and forwards are called with
`return_dict=False`, since transformers 5 renames their output classes' `cache_params` field.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import itertools
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from benchmarks.kernel_bench.timing import command_line
from ttt_helpers.model.convert import from_official

ROOT = Path(__file__).resolve().parents[1]

SHAPE = dict(vocab_size=101, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4)
ROWS, TOKENS = 2, 45
SPLITS = ([32] + [1] * 13, [21, 24], [16, 3, 2, 24])  # pieces of the 45 tokens, read in order
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def load_official(path: Path):
    """Their ttt.py as a module, with `_tied_weights_keys` in the form transformers 5 expects."""
    spec = importlib.util.spec_from_file_location("official_ttt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.TTTForCausalLM._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    module.rounded_gelu_bwd = module.gelu_bwd  # theirs, kept to put back after the exact one
    return module


def exact_gelu_bwd(x: torch.Tensor) -> torch.Tensor:
    """Their gelu_bwd with the exact constants sqrt(2/pi) and 3 * 0.044715 * sqrt(2/pi)."""
    t = torch.tanh(SQRT_2_OVER_PI * x * (1 + 0.044715 * x * x))
    return 0.5 * x * ((1 - t * t) * (SQRT_2_OVER_PI + 3 * 0.044715 * SQRT_2_OVER_PI * x * x)) + 0.5 * (1 + t)


def official_model(module, kind: str, mini_batch_size: int, mamba: bool, seed: int):
    """Their float64 model with every parameter moved off its initial value by a seeded amount."""
    config = module.TTTConfig(
        **SHAPE, ttt_layer_type=kind, mini_batch_size=mini_batch_size, pre_conv=mamba, share_qk=mamba, use_gate=mamba
    )
    torch.manual_seed(seed)
    model = module.TTTForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def their_logits(model, ids: torch.Tensor, cache=None) -> torch.Tensor:
    """Their body's output through their lm_head, in the weights' dtype."""
    use_cache = cache is not None
    hidden = model.model(input_ids=ids, cache_params=cache, use_cache=use_cache, return_dict=False)[0]
    return model.lm_head(hidden)


def our_pieces(model, ids: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Our logits with ids read piece by piece through the cache."""
    out, cache, start = [], None, 0
    for n in pieces:
        result = model(ids[:, start : start + n], cache=cache, use_cache=True)
        out.append(result.logits)
        cache, start = result.cache, start + n
    return torch.cat(out, dim=1)


def their_pieces(module, model, ids: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Their logits with ids read piece by piece through their TTTCache (which may raise)."""
    cache, out, start = module.TTTCache(model.model, ids.shape[0]), [], 0
    for n in pieces:
        out.append(their_logits(model, ids[:, start : start + n], cache))
        start += n
    return torch.cat(out, dim=1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def compare(module, kind: str, b: int, mamba: bool, seed: int) -> tuple[list[dict], list[dict]]:
    """The logit comparisons of one configuration and its streamed pieces."""
    theirs = official_model(module, kind, b, mamba, seed)
    ours = from_official(theirs.state_dict(), theirs.config.to_dict()).eval()
    ids = torch.randint(0, SHAPE["vocab_size"], (ROWS, TOKENS), generator=torch.Generator().manual_seed(seed + 2))
    case = dict(layer=kind, mini_batch_size=b, backbone="mamba" if mamba else "transformer")
    rows, streams = [], []
    with torch.no_grad():
        want = ours(ids, use_cache=False).logits
        derivatives = ("theirs", "exact") if kind == "mlp" else ("none",)
        for derivative in derivatives:
            module.gelu_bwd = exact_gelu_bwd if derivative == "exact" else module.rounded_gelu_bwd
            got = their_logits(theirs, ids)
            rows.append({**case, "gelu_derivative": derivative, "max_abs_diff": max_diff(got, want)})
        module.gelu_bwd = module.rounded_gelu_bwd
        whole = their_logits(theirs, ids)
        for pieces in SPLITS:
            entry = {**case, "pieces": pieces, "ours_max_abs_diff": max_diff(our_pieces(ours, ids, pieces), want)}
            try:
                entry["theirs_max_abs_diff"] = max_diff(their_pieces(module, theirs, ids, pieces), whole)
            except (ValueError, RuntimeError) as error:  # refused, or failed inside their layers
                entry["theirs_error"] = f"{type(error).__name__}: {error}"
            streams.append(entry)
    return rows, streams


def git(*args: str, cwd: Path) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def modified_imports() -> list[str]:
    """The files of ttt_helpers that this run imported and that differ from the recorded commit."""
    changed = (git("status", "--porcelain", "ttt_helpers", cwd=ROOT) or "").splitlines()
    imported = {
        str(Path(m.__file__).resolve().relative_to(ROOT))
        for name, m in sys.modules.items()
        if name.startswith("ttt_helpers") and getattr(m, "__file__", None)
    }
    return sorted(path for line in changed if (path := line[3:].strip()) in imported)


def provenance(official: Path) -> dict:
    return {
        "command": command_line(),
        "git_commit": git("rev-parse", "HEAD", cwd=ROOT),
        "ttt_helpers_modified": modified_imports(),
        "official_file_sha256": hashlib.sha256(official.read_bytes()).hexdigest(),
        "official_commit": git("rev-parse", "HEAD", cwd=official.parent),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", required=True, type=Path, help="ttt.py of ttt-lm-pytorch")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    module = load_official(args.official)
    torch.set_default_dtype(torch.float64)  # their buffers too (token_idx, RoPE's inv_freq)
    logits, streams = [], []
    for kind, b, mamba in itertools.product(("linear", "mlp"), (1, 16), (False, True)):
        rows, pieces = compare(module, kind, b, mamba, args.seed)
        logits += rows
        streams += pieces
        for row in rows:
            print(json.dumps(row), flush=True)
    result = {
        "what": "largest |logit difference| of convert.from_official against the authors' model, float64",
        "provenance": provenance(args.official),
        "shape": SHAPE,
        "tokens": [ROWS, TOKENS],
        "seed": args.seed,
        "logits": logits,
        "streaming": streams,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
