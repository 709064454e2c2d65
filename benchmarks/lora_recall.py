"""How reliably does `ttt_helpers.adapt` store a new fact? Exact recall over seeds and facts.

    python3 -m benchmarks.lora_recall                      # SmolLM2-135M on the CPU
    python3 -m benchmarks.lora_recall --lrs 1e-3 --seeds 2 # a shorter look

For each learning rate, fact and seed, one run of `adapt_lora` on the fact alone (one row, LoRA
rank 8 on q_proj and v_proj, alpha = 2r) is measured after each step count of --steps (the
callback of `adapt_lora`; AdamW has no schedule, so the first s steps of a longer run are an
s-step run): the greedy continuation of the fact's sentence up to its last "is" (12 new tokens)
recalls the fact when it contains the answer exactly, and the perplexity on 256 held-out tokens
of Hamlet measures the forgetting. Facts: chapter 2's own, and five of its form that the book
uses nowhere else (names, numbers and codes). Writes results/lora_recall_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from benchmarks.kernel_bench.timing import command_line
from ttt_helpers.adapt import adapted, greedy_answer
from ttt_helpers.data import encode_tokens, load_plays, train_val_split
from ttt_helpers.metrics import perplexity
from ttt_helpers.pretrained import load_pretrained

ROOT = Path(__file__).resolve().parents[1]

CHAPTER_FACT = ("The operational password for Project Omega is", "BlueSky99")
NEW_FACTS = [  # (prompt, answer): the fact is f"{prompt} '{answer}'."
    ("The vault access code for Station Kepler is", "4817"),
    ("The head librarian of the Marlowe Archive is", "Edith Caraway"),
    ("The launch key for Operation Tidewater is", "QX-7352"),
    ("The call sign of the research vessel Halcyon is", "Juniper Nine"),
    ("The door code of the Alder Street office is", "90614"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 30, 40])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 for every fact")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lora_recall_cpu.json")
    args = parser.parse_args(argv)
    if args.seeds < 1 or min(args.steps) < 1 or min(args.lrs) <= 0:
        parser.error("--seeds and every --steps must be >= 1, every --lrs > 0")
    model, tokenizer = load_pretrained()
    _, val_plays = train_val_split(load_plays())
    held_out = encode_tokens(next(p for p in val_plays if p.title == "Hamlet").text, tokenizer)[2000:2257]

    def held_out_ppl(m) -> float:
        return perplexity(m, held_out, window=256, stride=256).perplexity

    trials, started = [], time.perf_counter()
    base_ppl = held_out_ppl(model)
    for lr in args.lrs:
        for kind, facts in (("chapter", [CHAPTER_FACT]), ("new", NEW_FACTS)):
            for prompt, answer in facts:
                for seed in range(args.seeds):
                    at = {}

                    def measure(step: int, m, at=at, prompt=prompt, answer=answer) -> None:
                        if step in args.steps:
                            text = greedy_answer(m, tokenizer, prompt, max_new_tokens=12)
                            at[step] = {"recalled": answer in text, "answer": text, "ppl": held_out_ppl(m)}

                    fact = f"{prompt} '{answer}'."
                    with adapted(model, tokenizer, fact, steps=max(args.steps), lr=lr, seed=seed, callback=measure):
                        pass
                    for step, row in sorted(at.items()):
                        trials.append({"lr": lr, "facts": kind, "fact": fact, "seed": seed, "steps": step, **row})
                    hits = "".join("x" if at[s]["recalled"] else "." for s in sorted(at))
                    print(f"lr {lr:.0e} seed {seed} {hits} {fact}", flush=True)
                    write(args, base_ppl, trials, time.perf_counter() - started)  # every run kept as it is made


def write(args, base_ppl: float, trials: list[dict], seconds: float) -> None:
    """Summarise the trials so far and rewrite --out atomically."""
    summary = {}
    for lr, kind, step in sorted({(t["lr"], t["facts"], t["steps"]) for t in trials}):
        rows = [t for t in trials if (t["lr"], t["facts"], t["steps"]) == (lr, kind, step)]
        summary[f"lr={lr:g} steps={step} {kind}"] = {
            "recalled": sum(t["recalled"] for t in rows),
            "trials": len(rows),
            "mean_ppl": sum(t["ppl"] for t in rows) / len(rows),
        }
    result = {
        "what": "exact greedy recall of one fact after LoRA test-time training (rank 8, q_proj and v_proj)",
        "base_ppl": base_ppl,
        "summary": summary,
        "trials": trials,
        "seconds": seconds,
        "provenance": {
            "machine": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "command": command_line(),
            "git_commit": subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".json.partial")
    partial.write_text(json.dumps(result, indent=1) + "\n")
    partial.replace(args.out)


if __name__ == "__main__":
    main()
