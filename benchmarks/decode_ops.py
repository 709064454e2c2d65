"""Count the PyTorch operations one decode step of a 12-layer TTT-Linear model runs (on the CPU).

    python -m benchmarks.decode_ops            # this checkout
    python -m benchmarks.decode_ops OTHER_TREE # another checkout of the repository (git worktree)

Each operation that computes (views, reshapes and allocations left out) is a kernel launch on a
GPU, and a batch-64 decode step of a small model is bound by how many it launches. The model is
the 125M preset's depth at a small width; the TTT decode kernel is replaced by a stand-in that
counts its calls (one launch each), so that nothing of Triton's interpreter (which runs the
prompt's prefill) is counted. The count
does not depend on the width or the batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

NO_KERNEL = {  # operations that launch nothing: views, reshapes, allocations, scalar reads
    "view", "reshape", "transpose", "expand", "as_strided", "slice", "select", "unsqueeze", "squeeze", "permute",
    "t", "empty", "empty_like", "empty_strided", "detach", "alias", "split", "split_with_sizes", "chunk", "unbind",
    "contiguous", "_unsafe_view", "lift_fresh", "resolve_conj", "resolve_neg", "_reshape_alias", "result_type",
    "item", "_local_scalar_dense", "is_nonzero", "narrow", "flatten", "view_as", "expand_as", "unflatten",
    "to", "set_", "resize_",  # a .to that copies shows as its child copy_
}  # fmt: skip


def main(argv: list[str]) -> None:
    """Count in this checkout, or with argv = [OTHER_TREE] in a process that imports that tree's ttt_helpers."""
    if argv:
        tree = Path(argv[0]).resolve()
        root = str(Path(__file__).resolve().parents[1])  # where `benchmarks` is found from the other tree
        subprocess.run(
            [sys.executable, "-m", "benchmarks.decode_ops"],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": root},
            check=True,
        )
        return
    count_decode_ops()


def count_decode_ops() -> None:
    """Print the operations per decode step of the ttt_helpers that Python imports (its tree's first)."""
    os.environ["TRITON_INTERPRET"] = "1"  # the prompt's prefill runs its kernel on the CPU
    import torch
    from torch.profiler import ProfilerActivity, profile

    import ttt_helpers
    from ttt_helpers import kernels
    from ttt_helpers.model import TTTConfig, TTTForCausalLM

    launches = Counter()

    def stand_in(XQ, *args, **kwargs):  # the decode kernel's output, without running it
        launches["ttt_linear_decode"] += 1
        return torch.zeros_like(XQ)

    kernels.ttt_linear_decode = stand_in

    torch.manual_seed(0)
    config = TTTConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=12, num_attention_heads=4,
        ttt_impl="kernel",
    )  # fmt: skip
    model = TTTForCausalLM(config).eval()
    cache_name = "cache" if "cache" in model.forward.__code__.co_varnames else "past_key_values"
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = getattr(out, cache_name)
        model(ids[:, -1:], use_cache=True, **{cache_name: cache})  # a first step, untimed
        steps = 4
        launches.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                model(ids[:, -1:], use_cache=True, **{cache_name: cache})
    ops = Counter(
        e.name.removeprefix("aten::")
        for e in prof.events()
        if e.name.startswith("aten::") and not e.cpu_children and e.name.removeprefix("aten::") not in NO_KERNEL
    )
    ops.update(launches)
    tree = Path(ttt_helpers.__file__).resolve().parents[1]
    print(f"{tree}: {sum(ops.values()) / steps:.0f} operations per decode step")
    print("  " + ", ".join(f"{name} {n / steps:.0f}" for name, n in ops.most_common(10)))


if __name__ == "__main__":
    main(sys.argv[1:])
