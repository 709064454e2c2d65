"""Training TTT language models, and a Transformer of the same size, with one loop.

Documents are read in consecutive segments of `window` tokens. Each batch row walks through its
own document; a TTT model passes its state from one segment to the next of the same document
(state passing) and starts from its learned initial state only where a row begins a new document
or every `cache_reset_interval` segments. Gradients stop at segment boundaries (truncated
backpropagation through time). Around the loop: JSON-lines, TensorBoard and W&B logging,
atomic checkpoints with exact resume, DistributedDataParallel under `torchrun`, evaluation of
length generalization after training, and streaming generation that keeps the state.

Run `python -m ttt_helpers.train --help` for every option.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from . import checks, data, metrics
from .compat import cache_kwargs, output_cache
from .model import TTT_STANDARD_CONFIGS, TTTCache, TTTConfig, TTTForCausalLM

logger = logging.getLogger(__name__)

MODELS = ("ttt-linear", "ttt-mlp", "transformer")


def _opt(help_text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    """Everything that defines a training run. Load one from YAML/JSON with `from_file`."""

    # model
    model: str = _opt("ttt-linear, ttt-mlp or transformer (a Llama of the same shape, the baseline)", "ttt-linear")
    preset: str | None = _opt(f"a paper size preset {tuple(TTT_STANDARD_CONFIGS)}: sets the four size fields", None)
    hidden_size: int = _opt("model width", 128)
    intermediate_size: int = _opt("width of the SwiGLU feed-forward", 344)
    num_layers: int = _opt("number of blocks", 2)
    num_heads: int = _opt("heads of the TTT layer or of attention", 4)
    mini_batch_size: int = _opt("TTT inner mini-batch size (tokens per inner step)", 16)
    ttt_base_lr: float | None = _opt("TTT base inner learning rate (none: 1.0 linear, 0.1 mlp)", None)
    backbone: str = _opt("TTT backbone: transformer or mamba", "transformer")
    from_pretrained: str | None = _opt(
        "fine-tune this model folder (any AutoModelForCausalLM) instead of a new model", None
    )
    # data
    tokenizer: str = _opt("bytes (UTF-8 bytes, 256 ids), smollm2, or a tokenizer folder or hub id", "bytes")
    doc_tokens: int | None = _opt("cut every play into documents of at most this many tokens (none: whole plays)", None)
    window: int = _opt("training window: tokens per segment", 128)
    batch_size: int = _opt("rows (documents read in parallel) per process", 8)
    state_passing: bool = _opt("carry the TTT state across the segments of a document", True)
    cache_reset_interval: int | None = _opt("also reset the state every this many segments (none: never)", None)
    # optimisation
    max_steps: int = _opt("optimizer steps in the whole run", 200)
    lr: float = _opt("peak learning rate (AdamW)", 3e-3)
    min_lr_ratio: float = _opt("the cosine schedule ends at lr * min_lr_ratio", 0.1)
    warmup_steps: int = _opt("linear warm-up steps", 20)
    weight_decay: float = _opt("AdamW weight decay on matrices (parameters with >= 2 dims)", 0.1)
    beta1: float = _opt("AdamW beta1", 0.9)
    beta2: float = _opt("AdamW beta2", 0.95)
    grad_clip: float | None = _opt("clip the gradient norm to this (none: no clipping)", 1.0)
    seed: int = _opt("seed of the initial weights and the document order", 0)
    device: str = _opt("auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, ...", "auto")
    # evaluation after training
    eval_after: bool = _opt("measure length generalization on the validation plays after training", True)
    eval_tokens_per_doc: int | None = _opt("keep the first this many tokens of each validation play", 20_000)
    eval_lengths: int = _opt("number of evaluation lengths from 0.5x to 10x the window (>= 2)", 20)
    # output and logging
    out_dir: str = _opt("run folder: metrics.jsonl, checkpoints/, tensorboard/, the evaluation plot", "runs/ttt")
    log_every: int = _opt("write metrics every this many steps", 1)
    checkpoint_every: int | None = _opt("save a checkpoint every this many steps and at the end (none: never)", 100)
    keep_checkpoints: int = _opt("keep only the newest this many checkpoints", 2)
    resume: bool = _opt("continue from the newest checkpoint in out_dir", False)
    overwrite: bool = _opt(
        "replace the earlier run in a non-empty out_dir (deleting its files) instead of refusing", False
    )
    tensorboard: bool = _opt("also log to TensorBoard when it is installed", True)
    wandb: bool = _opt("also log to Weights & Biases (needs the wandb package)", False)
    wandb_offline: bool = _opt("W&B offline mode: write locally, sync later with `wandb sync`", False)
    wandb_project: str = _opt("W&B project name", "ttt-book")
    progress: bool = _opt("show a progress bar (only on a terminal)", True)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # the type of every field first, then the ranges
            _check_type(f.name, f.type, getattr(self, f.name))
        checks.one_of("model", self.model, MODELS)
        if self.preset is not None:
            if self.preset not in TTT_STANDARD_CONFIGS:
                raise ValueError(f"preset must be one of {tuple(TTT_STANDARD_CONFIGS)} or None, got {self.preset!r}")
            size = TTT_STANDARD_CONFIGS[self.preset]
            self.hidden_size, self.intermediate_size = size["hidden_size"], size["intermediate_size"]
            self.num_layers, self.num_heads = size["num_hidden_layers"], size["num_attention_heads"]
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "mini_batch_size",
            "batch_size",
            "max_steps",
            "log_every",
            "keep_checkpoints",
        ):
            checks.integer(name, getattr(self, name), 1)
        checks.integer("eval_lengths", self.eval_lengths, 2)
        for name in ("doc_tokens", "cache_reset_interval", "checkpoint_every", "eval_tokens_per_doc"):
            checks.optional_integer(name, getattr(self, name), 1)
        checks.integer("window", self.window, 2)
        if self.model != "transformer" and self.from_pretrained is None and self.window % self.mini_batch_size:
            raise ValueError(
                f"window ({self.window}) must be a multiple of mini_batch_size ({self.mini_batch_size}), "
                "so that every segment starts at an inner mini-batch boundary"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        checks.positive("lr", self.lr)
        checks.real("min_lr_ratio", self.min_lr_ratio, 0, 1)
        checks.integer("warmup_steps", self.warmup_steps, 0)
        checks.real("weight_decay", self.weight_decay, 0)
        checks.real("beta1", self.beta1, 0, 1, high_open=True)
        checks.real("beta2", self.beta2, 0, 1, high_open=True)
        if self.grad_clip is not None:
            checks.positive("grad_clip", self.grad_clip)
        if self.ttt_base_lr is not None:
            checks.positive("ttt_base_lr", self.ttt_base_lr)
        checks.integer("seed", self.seed, 0)
        checks.one_of("backbone", self.backbone, ("transformer", "mamba"))
        for name in ("tokenizer", "out_dir", "wandb_project", "device"):
            checks.string(name, getattr(self, name))
        if self.from_pretrained is not None:
            checks.string("from_pretrained", self.from_pretrained)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(
                    f"device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got {self.device!r}"
                ) from None
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run in out_dir, or replace it")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from a mapping of field names; unknown names and wrong types raise ValueError."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: _convert(k, known[k].type, v) for k, v in values.items()})

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> TrainConfig:
        """Load a YAML (.yaml, .yml) or JSON (.json) mapping of fields; `overrides` win over the file."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        text = path.read_text()
        if path.suffix == ".json":
            values = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            if importlib.util.find_spec("yaml") is None:
                raise ValueError(f"reading {path} needs PyYAML (pip install pyyaml); or write the config as JSON")
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            raise ValueError(f"config file must end in .yaml, .yml or .json, got {path.name}")
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of fields, got {type(values).__name__}")
        return cls.from_dict({**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(name: str, annotation: str, value: Any) -> None:
    """Raise a TypeError unless `value` has the type of a field annotated `annotation`, e.g. 'int | None'."""
    optional = annotation.endswith("| None")
    base = annotation.replace("| None", "").strip()
    if value is None:
        if not optional:
            raise TypeError(f"{name} must be a {base}, got None")
        return
    check = {"bool": checks.boolean, "int": checks.integer, "float": checks.real, "str": checks.string}[base]
    if base == "str":
        check(name, value, empty=True)
    elif base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    else:
        check(name, value)


def _convert(name: str, annotation: str, value: Any) -> Any:
    """Check (and for strings, parse) one config value against its field's annotation, e.g. 'int | None'."""
    optional = annotation.endswith("| None")
    base = annotation.replace("| None", "").strip()
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{name} must be a {base}, got None")
    if base == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    kind = {"int": int, "float": float, "str": str}[base]
    if isinstance(value, bool) or (kind is int and isinstance(value, float)):
        raise ValueError(f"{name} must be a {base}, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a {base}, got {value!r}") from None


# ---------------------------------------------------------------- data


def load_tokenizer(name: str):
    """None for "bytes" (UTF-8 bytes as ids 0..255), else a Hugging Face tokenizer."""
    checks.string("name", name)
    if name == "bytes":
        return None
    if name == "smollm2":
        from .models import load_pretrained

        return load_pretrained()[1]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def encode(text: str, tokenizer=None) -> Tensor:
    """Token ids [N] of `text`: UTF-8 bytes when tokenizer is None."""
    checks.string("text", text, empty=True)
    return data.encode_bytes(text) if tokenizer is None else data.encode_tokens(text, tokenizer)


def load_corpus(config: TrainConfig, tokenizer=None) -> tuple[list[Tensor], list[Tensor]]:
    """Training and validation documents (1-D token ids) from the Shakespeare plays, split by play."""
    train_plays, val_plays = data.train_val_split(data.load_plays())
    train_docs = [encode(p.text, tokenizer) for p in train_plays]
    if config.doc_tokens is not None:
        train_docs = [part for doc in train_docs for part in doc.split(config.doc_tokens)]
    val_docs = [encode(p.text, tokenizer)[: config.eval_tokens_per_doc] for p in val_plays]
    return train_docs, val_docs


@dataclass
class Batch:
    """One segment per row: inputs, targets [B, window] (targets = inputs shifted by one token);
    reset [B] is True where the row starts from the learned initial state."""

    inputs: Tensor
    targets: Tensor
    reset: Tensor


class SegmentStream:
    """Consecutive segments of documents, one document per batch row.

    All processes share one document queue, shuffled each epoch from `seed`: whenever a row has
    read every whole segment of its document (a document of N tokens has (N - 1) // window), it
    takes the next document of the queue and its state is reset. There are `rows * world_size`
    rows in all; process `rank` reads rows rank, rank + world_size, ... The position in the data
    is a few integers (`state_dict`), so a resumed run reads exactly what it would have read.
    """

    def __init__(
        self,
        documents: Sequence[Tensor],
        window: int,
        rows: int,
        *,
        seed: int = 0,
        reset_interval: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        checks.integer("window", window, 1)
        checks.integer("rows", rows, 1)
        checks.integer("seed", seed)
        checks.optional_integer("reset_interval", reset_interval, 1)
        checks.integer("world_size", world_size, 1)
        checks.integer("rank", rank, 0, world_size - 1)
        if not isinstance(documents, (list, tuple)):
            raise TypeError(f"documents must be a list of 1-D LongTensors, got {type(documents).__name__}")
        if len(documents) == 0:
            raise ValueError("documents must hold at least one document, got none")
        for i, doc in enumerate(documents):
            if not isinstance(doc, Tensor) or doc.dim() != 1 or doc.dtype != torch.long:
                raise ValueError(f"documents[{i}] must be a 1-D LongTensor of token ids")
        self.docs = [d for d in documents if d.numel() > window]
        if not self.docs:
            longest = max(d.numel() for d in documents)
            raise ValueError(
                f"no document has the window + 1 = {window + 1} tokens one segment needs (the longest has {longest})"
            )
        self.window, self.seed, self.reset_interval = window, seed, reset_interval
        self.rank, self.world_size = rank, world_size
        self.segments = [(d.numel() - 1) // window for d in self.docs]
        total = rows * world_size
        self.epoch, self.next_doc = 0, 0
        self.row_doc, self.row_segment, self.row_age = [-1] * total, [0] * total, [0] * total
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.docs), generator=gen).tolist()

    def _take_document(self) -> int:
        if self.next_doc == len(self._order):
            self.epoch, self.next_doc = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        self.next_doc += 1
        return self._order[self.next_doc - 1]

    def next_batch(self) -> Batch:
        inputs, targets, reset = [], [], []
        for row in range(len(self.row_doc)):
            new_doc = self.row_doc[row] < 0 or self.row_segment[row] == self.segments[self.row_doc[row]]
            if new_doc:
                self.row_doc[row], self.row_segment[row] = self._take_document(), 0
            restart = new_doc or self.row_age[row] == self.reset_interval
            if restart:
                self.row_age[row] = 0
            if row % self.world_size == self.rank:
                start = self.row_segment[row] * self.window
                doc = self.docs[self.row_doc[row]]
                inputs.append(doc[start : start + self.window])
                targets.append(doc[start + 1 : start + self.window + 1])
                reset.append(restart)
            self.row_segment[row] += 1
            self.row_age[row] += 1
        return Batch(torch.stack(inputs), torch.stack(targets), torch.tensor(reset))

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "next_doc": self.next_doc,
            "row_doc": list(self.row_doc),
            "row_segment": list(self.row_segment),
            "row_age": list(self.row_age),
            "documents": len(self.docs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["documents"] != len(self.docs) or len(state["row_doc"]) != len(self.row_doc):
            raise ValueError("the saved data position does not fit these documents, rows and processes")
        self.epoch, self.next_doc = state["epoch"], state["next_doc"]
        self.row_doc, self.row_segment = list(state["row_doc"]), list(state["row_segment"])
        self.row_age = list(state["row_age"])
        self._order = self._epoch_order(self.epoch)


# ---------------------------------------------------------------- model and state


def build_model(config: TrainConfig, vocab_size: int) -> nn.Module:
    """A new TTT model or Llama baseline of the configured shape (seeded), or the pretrained one."""
    checks.integer("vocab_size", vocab_size, 1)
    if config.from_pretrained is not None:
        with _no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(config.from_pretrained, dtype=torch.float32)
        if model.config.vocab_size < vocab_size:
            raise ValueError(
                f"from_pretrained model has vocab_size {model.config.vocab_size}, but the tokenizer needs {vocab_size}"
            )
        if isinstance(model, TTTForCausalLM) and config.window % model.config.mini_batch_size:
            raise ValueError(
                f"window ({config.window}) must be a multiple of the pretrained model's "
                f"mini_batch_size ({model.config.mini_batch_size})"
            )
        return model
    torch.manual_seed(config.seed)
    shape = dict(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        tie_word_embeddings=True,
    )
    if config.model == "transformer":
        return LlamaForCausalLM(
            LlamaConfig(
                **shape,
                num_key_value_heads=config.num_heads,
                rms_norm_eps=1e-6,
                max_position_embeddings=config.window,
                bos_token_id=None,
                eos_token_id=None,
            )
        )
    return TTTForCausalLM(
        TTTConfig(
            **shape,
            ttt_layer_type=config.model.removeprefix("ttt-"),
            mini_batch_size=config.mini_batch_size,
            ttt_base_lr=config.ttt_base_lr,
            backbone=config.backbone,
            bos_token_id=None,
            eos_token_id=None,
        )
    )


def carry_state(model: TTTForCausalLM, cache: TTTCache | None, reset: Tensor) -> TTTCache:
    """The cache a segment starts from: rows with reset[b] at the learned initial state, others continue.

    cache: the (detached) cache at the end of the previous segment, or None at the start.
    The fresh state is built for every row and selected per row with `torch.where`, so the
    learned initial state takes part in every step (with a zero gradient where no row resets),
    as DistributedDataParallel expects of every parameter.
    """
    fresh = model.model.new_cache(reset.numel())
    if cache is None:
        return fresh
    rows = reset.to(fresh.states[0][0].device)

    def pick(new: Tensor, old: Tensor) -> Tensor:
        return torch.where(rows.view(-1, *[1] * (old.dim() - 1)), new, old)

    states = [tuple(pick(n, o) for n, o in zip(new, old)) for new, old in zip(fresh.states, cache.states)]
    convs = [None if c is None else pick(torch.zeros_like(c), c) for c in cache.conv_states]
    # the window is a multiple of the mini-batch size: every segment starts at position 0
    return TTTCache(states, convs, seen_tokens=0)


def segment_loss(model: nn.Module, batch: Batch, cache: TTTCache | None) -> tuple[Tensor, TTTCache | None]:
    """Mean next-token loss of one segment; with a cache, the TTT state continues from it.

    Returns the loss and the cache at the end of the segment (still attached to the graph).
    """
    if cache is None:
        out = model(input_ids=batch.inputs, use_cache=False)
    else:
        out = model(input_ids=batch.inputs, use_cache=True, **cache_kwargs(cache))
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), batch.targets.flatten())
    return loss, (output_cache(out) if cache is not None else None)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr` over warmup_steps, then cosine decay to lr * min_lr_ratio at max_steps."""
    checks.integer("step", step, 0)
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


# ---------------------------------------------------------------- logging


class RunLogger:
    """Metrics to `out_dir/metrics.jsonl` (always), TensorBoard (if installed) and W&B (if asked)."""

    def __init__(self, out_dir: Path, config: TrainConfig) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.tensorboard = self.wandb = None
        if config.tensorboard:
            if importlib.util.find_spec("tensorboard") is None:
                logger.info("TensorBoard is not installed (pip install tensorboard): logging to %s only", self.path)
            else:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"))
        if config.wandb or config.wandb_offline:
            self.wandb = self._start_wandb(out_dir, config)

    @staticmethod
    def _start_wandb(out_dir: Path, config: TrainConfig):
        if importlib.util.find_spec("wandb") is None:
            raise ValueError("wandb logging (wandb or wandb_offline) needs the wandb package: pip install wandb")
        import wandb

        kwargs = dict(project=config.wandb_project, dir=str(out_dir), config=config.to_dict())
        if config.wandb_offline:
            return wandb.init(mode="offline", **kwargs)
        try:
            return wandb.init(mode="online", **kwargs)
        except Exception as err:  # no network or no login: keep the run, write it locally instead
            logger.warning("W&B online mode failed (%s): logging offline; sync later with `wandb sync`", err)
            return wandb.init(mode="offline", **kwargs)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (it must hold "step") to every sink."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


# ---------------------------------------------------------------- distributed and checkpoints


def _init_distributed(config: TrainConfig) -> tuple[torch.device, bool]:
    """The device, and whether a process group was started here (under torchrun: WORLD_SIZE > 1)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # one GPU per process under torchrun
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device: {device} (LOCAL_RANK={local_rank}) does not exist, this machine has "
            f"{torch.cuda.device_count()} CUDA GPU(s); start at most one process per GPU or pass device='cpu'"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return device, True
    return device, False


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_processes(flag: bool) -> bool:
    """Whether `flag` holds on every process (itself without a process group)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor(int(flag), device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


class CorruptCheckpoint(ValueError):
    """A file of a checkpoint cannot be read (truncated or garbled)."""


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's list of names, to the disk (folders: where the system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return  # Windows cannot open a folder; its renames are durable without this
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Keep transformers' save/load progress bars out of logs and notebooks."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# what a run writes into its out_dir: the only names overwrite=True deletes
_RUN_FILES = ("metrics.jsonl", "checkpoints", "tensorboard", "wandb", "length_generalization.png")


def _check_out_dir(config: TrainConfig) -> None:
    """Refuse a run folder that already holds a run, unless resume (continue it) or overwrite
    (replace it: only the names a run writes, so no other file is ever deleted)."""
    out = Path(config.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not config.resume:
        if not config.overwrite:
            raise ValueError(
                f"out_dir {out} is not empty (it holds {', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''}): "
                "pass resume=True (--resume) to continue that run, overwrite=True (--overwrite) to delete it "
                "and start again, or choose another out_dir"
            )
        foreign = [e for e in entries if e not in _RUN_FILES]
        if foreign:
            raise ValueError(
                f"overwrite=True refuses to clear out_dir {out}: it holds {foreign}, which a training run "
                f"does not write (a run writes only {list(_RUN_FILES)}); remove them or choose another out_dir"
            )
    _barrier()  # every process has looked before process 0 deletes or writes anything


def _clear_out_dir(config: TrainConfig, rank: int) -> None:
    """With overwrite (and no resume), process 0 deletes the earlier run's files in out_dir."""
    out = Path(config.out_dir)
    if config.overwrite and out.is_dir():
        if rank == 0:
            for name in _RUN_FILES:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        _barrier()


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint folder `out_dir/checkpoints/step-NNNNNNNN`, or None.

    Checkpoints appear under that name only once complete (see `Trainer.save`).
    """
    folders = sorted((Path(out_dir) / "checkpoints").glob("step-*"))
    return folders[-1] if folders else None


# fields a resumed run may change; any other difference from the checkpoint's config is an error
_RESUME_MAY_CHANGE = {
    "max_steps",
    "out_dir",
    "resume",
    "overwrite",
    "progress",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_after",
    "eval_tokens_per_doc",
    "eval_lengths",
    "tensorboard",
    "wandb",
    "wandb_offline",
    "wandb_project",
    "device",
    "from_pretrained",
}


# ---------------------------------------------------------------- the training loop


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm of a step is not finite (nan or inf): the run cannot go on."""


class Trainer:
    """One process's part of a run: the model, optimizer, data stream and carried TTT caches.

    Built new from the config, or, with `config.resume`, from the newest checkpoint in
    `out_dir` that can be read (unreadable newer ones are set aside with a warning), so that the following steps are exactly those of an uninterrupted run. Under
    torchrun (a process group is initialized) the model is wrapped in DistributedDataParallel
    and process `rank` reads its own rows of documents.
    """

    def __init__(
        self, config: TrainConfig, train_docs: Sequence[Tensor], tokenizer=None, device: torch.device | str = "cpu"
    ) -> None:
        self.config, self.tokenizer, self.device = config, tokenizer, torch.device(device)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.out_dir = Path(config.out_dir)
        self.stream = SegmentStream(
            train_docs,
            config.window,
            config.batch_size,
            seed=config.seed,
            reset_interval=config.cache_reset_interval,
            rank=self.rank,
            world_size=self.world,
        )
        saved = None
        if config.resume:
            checkpoint, saved = self._newest_intact_checkpoint()
            model = saved["model"]
        else:
            model = build_model(config, 256 if tokenizer is None else len(tokenizer))
        for i, doc in enumerate(train_docs):
            checks.token_ids(f"train_docs[{i}]", doc, model.config.vocab_size)
        self.model = model.to(self.device).train()
        self.state_passing = config.state_passing and isinstance(model, TTTForCausalLM)
        if config.state_passing and not self.state_passing:
            logger.warning(
                "state_passing applies to TTT models only: the %s reads every segment from scratch",
                type(model).__name__,
            )
        self.optimizer = _optimizer(self.model, config)
        self.step, self.tokens, self.cache = 0, 0, None
        if saved is not None:
            self._restore(checkpoint, saved)
        self.ddp = self.model  # what the forward pass runs through
        if self.world > 1:
            on_gpu = self.device.type == "cuda"
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device] if on_gpu else None)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step on the next segment of every row. Returns its metrics."""
        batch = self.stream.next_batch()
        batch = Batch(batch.inputs.to(self.device), batch.targets.to(self.device), batch.reset)
        cache = carry_state(self.model, self.cache, batch.reset) if self.state_passing else None
        lr = learning_rate(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, cache = segment_loss(self.ddp, batch, cache)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip or math.inf)
        loss = loss.detach()
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        if not (math.isfinite(loss.item()) and math.isfinite(grad_norm.item())):  # the same on every process
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"step {self.step + 1}: the loss is {loss.item()} and the gradient norm {grad_norm.item()}; "
                f"training stopped before this step changed the weights, and no checkpoint of it was written. "
                f"Try a lower lr (now {self.config.lr}) or ttt_base_lr, or grad_clip (now {self.config.grad_clip})"
            )
        self.optimizer.step()
        self.cache = None if cache is None else cache.detach()  # truncated BPTT: no gradient across segments
        self.step += 1
        self.tokens += batch.inputs.numel() * self.world
        return {
            "step": self.step,
            "loss": loss.item(),
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "tokens": self.tokens,
            "resets": int(batch.reset.sum()),
        }  # resets: this process's rows

    def save(self) -> Path:
        """Write `checkpoints/step-NNNNNNNN` atomically: into a temporary folder, then renamed.

        Process 0 writes the weights (`model/`, safetensors, loadable with AutoModelForCausalLM),
        the optimizer state and `trainer_state.json`; every process writes `rank-R.pt` with its
        data position, its carried TTT caches and its RNG states. A failure leaves no folder.
        """
        parent = self.out_dir / "checkpoints"
        final, tmp = parent / f"step-{self.step:08d}", parent / f".tmp-step-{self.step:08d}"
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash
                tmp.mkdir(parents=True)
            _barrier()
            if self.rank == 0:
                with _no_progress_bars():
                    self.model.save_pretrained(tmp / "model")
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp / "model")
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                state = {
                    "step": self.step,
                    "tokens": self.tokens,
                    "world_size": self.world,
                    "config": self.config.to_dict(),
                }
                (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            cache = None
            if self.cache is not None:
                cache = {
                    "states": [list(t) for t in self.cache.states],
                    "conv_states": self.cache.conv_states,
                    "seen_tokens": self.cache.seen_tokens,
                }
            torch.save(
                {
                    "stream": self.stream.state_dict(),
                    "cache": cache,
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "python_rng": random.getstate(),
                },
                tmp / f"rank-{self.rank}.pt",
            )
            if self.rank == 0:  # on the disk before the rename: a complete name never shows incomplete files
                for path in [*sorted(tmp.rglob("*")), tmp]:
                    _fsync(path)
            else:
                _fsync(tmp / f"rank-{self.rank}.pt")
            _barrier()
            if self.rank == 0:
                if final.exists():  # this step was saved before: swap the new folder in
                    old = parent / f".old-step-{self.step:08d}"
                    final.rename(old)
                    tmp.rename(final)
                    shutil.rmtree(old)
                else:
                    tmp.rename(final)
                for stale in sorted(parent.glob("step-*"))[: -self.config.keep_checkpoints]:
                    shutil.rmtree(stale)
                _fsync(parent)
        finally:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        return final

    def _read_checkpoint(self, folder: Path) -> dict[str, Any]:
        """Everything this process needs from checkpoint `folder`, read into memory.

        Raises a CorruptCheckpoint naming the file that cannot be read."""

        def read(path: Path, load: Callable[[Path], Any]) -> Any:
            try:
                return load(path)
            except Exception as err:  # a truncated or garbled file: safetensors, JSON and pickle errors differ
                raise CorruptCheckpoint(f"{path} cannot be read ({type(err).__name__}: {err})") from err

        def load_model(path: Path) -> nn.Module:
            with _no_progress_bars():
                return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

        def load_torch(path: Path) -> Any:
            return torch.load(path, map_location=self.device, weights_only=True)

        return {
            "trainer": read(folder / "trainer_state.json", lambda p: json.loads(p.read_text())),
            "model": read(folder / "model", load_model),
            "optimizer": read(folder / "optimizer.pt", load_torch),
            "rank": read(folder / f"rank-{self.rank}.pt", load_torch),
        }

    def _newest_intact_checkpoint(self) -> tuple[Path, dict[str, Any]]:
        """The newest checkpoint that every process can read, and its contents; unreadable newer
        ones are renamed to `corrupt-step-NNNNNNNN` (so rotation never counts them) with a warning."""
        folders = sorted((self.out_dir / "checkpoints").glob("step-*"), reverse=True)
        if not folders:
            raise ValueError(f"resume=True but {self.out_dir / 'checkpoints'} holds no checkpoint")
        problems = []
        for folder in folders:
            try:
                saved, problem = self._read_checkpoint(folder), None
            except CorruptCheckpoint as err:
                saved, problem = None, str(err)
            if _all_processes(problem is None):
                return folder, saved
            problems.append(problem or f"{folder} cannot be read by another process")
            logger.warning("resume: %s; trying the checkpoint before it", problems[-1])
            _barrier()
            if self.rank == 0:
                aside = folder.with_name("corrupt-" + folder.name)
                for k in range(1, 1000):
                    if not aside.exists():
                        break
                    aside = folder.with_name(f"corrupt-{folder.name}-{k}")
                folder.rename(aside)
            _barrier()
        raise ValueError("resume=True but no checkpoint in out_dir can be read:\n" + "\n".join(problems))

    def _restore(self, folder: Path, contents: dict[str, Any]) -> None:
        saved = contents["trainer"]
        changed = sorted(
            k for k, v in self.config.to_dict().items() if k not in _RESUME_MAY_CHANGE and saved["config"].get(k) != v
        )
        if changed:
            raise ValueError(f"resume=True with a config that differs from the checkpoint's in {changed}")
        if saved["world_size"] != self.world:
            raise ValueError(
                f"the checkpoint was written by {saved['world_size']} processes, this run has {self.world}"
            )
        self.step, self.tokens = saved["step"], saved["tokens"]
        self.optimizer.load_state_dict(contents["optimizer"])
        mine = contents["rank"]
        self.stream.load_state_dict(mine["stream"])
        if mine["cache"] is not None:
            c = mine["cache"]
            self.cache = TTTCache([tuple(s) for s in c["states"]], c["conv_states"], c["seen_tokens"])
        torch.set_rng_state(mine["torch_rng"].cpu())
        if mine["cuda_rng"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in mine["cuda_rng"]])
        random.setstate(mine["python_rng"])
        logger.info("resumed from %s at step %d", folder, self.step)


def evaluate_length_generalization(
    model: nn.Module, documents: Sequence[Tensor], config: TrainConfig, out_dir: Path | None = None
) -> metrics.LengthGeneralization:
    """`metrics.length_generalization` at config.eval_lengths lengths from 0.5x to 10x the window;
    the plot goes to `out_dir/length_generalization.png` when out_dir is given."""
    result = metrics.length_generalization(model, documents, train_window=config.window, n=config.eval_lengths)
    if out_dir is not None:
        from matplotlib.figure import Figure  # not pyplot: nothing pops up in notebooks

        fig = Figure(figsize=(6, 3.5), layout="constrained")
        result.plot(fig.subplots())
        fig.savefig(out_dir / "length_generalization.png", dpi=100)
    return result


@dataclass
class TrainResult:
    """What `train` returns. losses[i] is the training loss (mean over processes) of step
    start_step + i + 1; length_generalization is None without eval_after and on processes > 0."""

    model: nn.Module
    losses: list[float]
    start_step: int
    step: int
    tokens: int
    out_dir: Path
    length_generalization: metrics.LengthGeneralization | None
    config: TrainConfig


def train(
    config: TrainConfig,
    *,
    train_docs: Sequence[Tensor] | None = None,
    val_docs: Sequence[Tensor] | None = None,
    tokenizer=None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train as `config` says; under torchrun, with DistributedDataParallel over the processes.

    train_docs, val_docs: lists of 1-D token-id tensors; by default the Shakespeare plays encoded
    with `config.tokenizer` (loaded here; pass `tokenizer` along with your own documents if they
    are not bytes). After every step `callback(step, metrics)` runs, after that step's checkpoint;
    an exception from it stops the run. With `eval_after`, process 0 then measures length
    generalization on val_docs and saves its plot in out_dir. A resumed run appends to
    `metrics.jsonl`; each start writes a record with "event": "start". A non-empty out_dir is
    refused unless `resume` (continue it) or `overwrite` (delete the earlier run's files first).
    Every setting, the documents and the evaluation are checked before the first step; a step
    whose loss or gradient norm is not finite raises TrainingDiverged before it changes the
    weights or writes a checkpoint.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be a function callback(step, metrics) or None, got {type(callback).__name__}")
    if (config.wandb or config.wandb_offline) and importlib.util.find_spec("wandb") is None:
        raise ValueError("wandb logging (wandb or wandb_offline) needs the wandb package: pip install wandb")
    device, started = _init_distributed(config)
    run_log = None
    try:
        rank = dist.get_rank() if dist.is_initialized() else 0
        _check_out_dir(config)
        if train_docs is None:
            tokenizer = load_tokenizer(config.tokenizer)
            train_docs, plays_val = load_corpus(config, tokenizer)
            val_docs = plays_val if val_docs is None else val_docs
        if isinstance(val_docs, (list, tuple)) and not val_docs:
            val_docs = []
        elif val_docs is not None:
            val_docs = metrics.check_documents(val_docs, "val_docs")
        trainer = Trainer(config, train_docs, tokenizer, device)
        model = trainer.model
        if config.eval_after and rank == 0 and val_docs:
            for i, doc in enumerate(val_docs):
                checks.token_ids(f"val_docs[{i}]", doc, model.config.vocab_size)
            metrics.evaluation_lengths(val_docs, train_window=config.window, n=config.eval_lengths, name="val_docs")
        _clear_out_dir(config, rank)
        trainer.out_dir.mkdir(parents=True, exist_ok=True)
        if trainer.rank == 0:
            run_log = RunLogger(trainer.out_dir, config)
            run_log.log(
                {
                    "step": trainer.step,
                    "event": "start",
                    "model": type(model).__name__,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "world_size": trainer.world,
                    "state_passing": trainer.state_passing,
                    "config": config.to_dict(),
                }
            )
        from tqdm import tqdm

        start_step, start_tokens, start_time, losses = trainer.step, trainer.tokens, time.perf_counter(), []
        bar = tqdm(
            total=config.max_steps,
            initial=start_step,
            unit="step",
            disable=not (config.progress and trainer.rank == 0 and sys.stderr.isatty()),
        )
        while trainer.step < config.max_steps:
            record = trainer.train_step()
            record["tokens_per_s"] = (trainer.tokens - start_tokens) / (time.perf_counter() - start_time)
            losses.append(record["loss"])
            step = trainer.step
            if run_log is not None and (step % config.log_every == 0 or step == config.max_steps):
                run_log.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            bar.update(1)
            every = config.checkpoint_every
            if every is not None and (step % every == 0 or step == config.max_steps):
                trainer.save()
            if callback is not None:
                callback(step, record)
        bar.close()
        model.eval()
        result = TrainResult(model, losses, start_step, trainer.step, trainer.tokens, trainer.out_dir, None, config)
        if config.eval_after and run_log is not None and val_docs:
            lg = evaluate_length_generalization(model, [d.to(device) for d in val_docs], config, trainer.out_dir)
            result.length_generalization = lg
            run_log.log(
                {
                    "step": trainer.step,
                    "event": "eval",
                    "train_window": lg.train_window,
                    "lengths": [r.length for r in lg.rows],
                    "perplexities": [r.perplexity for r in lg.rows],
                    "eval/perplexity_at_1x": lg.at_1x,
                    "eval/degradation": lg.degradation,
                }
            )
        return result
    finally:
        if run_log is not None:
            run_log.close()
        if started:
            dist.destroy_process_group()


# ---------------------------------------------------------------- streaming generation


def new_cache(model: nn.Module, batch_size: int = 1):
    """An empty cache for `model`: a TTTCache at the learned initial state, else a KV cache."""
    checks.module("model", model)
    checks.integer("batch_size", batch_size, 1)
    if isinstance(model, TTTForCausalLM):
        return model.model.new_cache(batch_size)
    return DynamicCache(config=model.config)


class _Detokenizer:
    """Turns token ids into text piece by piece, holding back incomplete characters."""

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""
        self.bytes = codecs.getincrementaldecoder("utf-8")(errors="replace") if tokenizer is None else None

    def push(self, token: int) -> str:
        if self.bytes is not None:
            return self.bytes.decode(bytes([token]))
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece

    def flush(self) -> str:
        """What is still held back (an incomplete character becomes U+FFFD)."""
        if self.bytes is not None:
            return self.bytes.decode(b"", final=True)
        return self.tokenizer.decode(self.ids)[len(self.sent) :]


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    cache=None,
    *,
    temperature: float = 0.8,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[str]:
    """Read `prompt`, then yield the text of each new token as soon as it is sampled.

    tokenizer: None for byte-level models, else a Hugging Face tokenizer. cache: the state to
    continue (`new_cache(model)` or one used before); it is updated in place, so after the
    generator is exhausted it has read the prompt and every generated token, and the next call
    continues the same text. temperature 0 is greedy decoding.
    """
    checks.module("model", model)
    checks.string("prompt", prompt, empty=True)
    checks.integer("max_new_tokens", max_new_tokens, 1)
    checks.real("temperature", temperature, 0)
    checks.optional_integer("top_k", top_k, 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    ids = encode(prompt, tokenizer)
    if ids.numel() == 0:
        raise ValueError("prompt must encode to at least one token, got an empty prompt")
    vocab = checks.model_vocab_size(model)
    checks.token_ids("prompt (encoded)", ids, vocab)
    cache = new_cache(model) if cache is None else cache
    return _stream(model, tokenizer, ids, max_new_tokens, cache, temperature, top_k, generator)  # checked: now run


@torch.no_grad()
def _stream(model, tokenizer, ids, max_new_tokens, cache, temperature, top_k, generator) -> Iterator[str]:
    """The generator behind `stream_generate`, on checked arguments."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    detok = _Detokenizer(tokenizer)
    inputs = ids[None].to(device)
    try:
        for _ in range(max_new_tokens):
            logits = model(input_ids=inputs, use_cache=True, **cache_kwargs(cache)).logits[0, -1].float()
            if temperature == 0:
                token = int(logits.argmax())
            else:
                if top_k is not None:
                    logits[logits < logits.topk(min(top_k, logits.numel())).values[-1]] = -math.inf
                probs = (logits / temperature).softmax(-1).cpu()
                token = int(torch.multinomial(probs, 1, generator=generator))
            piece = detok.push(token)
            if piece:
                yield piece
            inputs = torch.tensor([[token]], device=device)
        model(input_ids=inputs, use_cache=True, **cache_kwargs(cache))  # read the last token too
        tail = detok.flush()
        if tail:
            yield tail
    finally:
        model.train(was_training)


class Chat:
    """A conversation whose state persists between turns: each turn continues the same cache.

    turn(text) reads `text` after everything said so far and streams the reply, printing it
    as it comes when echo is on. `loop()` does the same with lines typed at a prompt.
    """

    def __init__(
        self, model: nn.Module, tokenizer=None, *, temperature: float = 0.8, top_k: int | None = None, seed: int = 0
    ) -> None:
        checks.module("model", model)
        checks.real("temperature", temperature, 0)
        checks.optional_integer("top_k", top_k, 1)
        checks.integer("seed", seed)
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.top_k = temperature, top_k
        self.generator = torch.Generator().manual_seed(seed)
        self.cache = new_cache(model)

    def turn(self, text: str, max_new_tokens: int = 100, *, echo: bool = True) -> str:
        pieces = []
        for piece in stream_generate(
            self.model,
            self.tokenizer,
            text,
            max_new_tokens,
            self.cache,
            temperature=self.temperature,
            top_k=self.top_k,
            generator=self.generator,
        ):
            pieces.append(piece)
            if echo:
                print(piece, end="", flush=True)
        if echo:
            print()
        return "".join(pieces)

    def loop(self, max_new_tokens: int = 200, read: Callable[[str], str] = input) -> None:
        """Alternate turns with lines read from `read` until an empty line or end of input."""
        while True:
            try:
                text = read("> ")
            except EOFError:
                return
            if not text:
                return
            self.turn(text + "\n", max_new_tokens)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ttt_helpers.train",
        description="Train a TTT language model (or the Transformer baseline) on the Shakespeare plays with "
        "state passing. Options override the --config file; under torchrun every process trains "
        "its own rows with DistributedDataParallel.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML or JSON file of TrainConfig fields (default: none)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, metavar=f.type.replace(" | None", "").upper(), help=help_text)
    return parser


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """The TrainConfig of a command line: the --config file (if any), then the options given."""
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config", None)
    return TrainConfig.from_file(path, **args) if path else TrainConfig.from_dict(args)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """The command line: a bad option or config value exits with status 2 and says which; a run
    whose loss stops being finite exits with status 1."""
    try:
        config = parse_config(argv)
    except (TypeError, ValueError) as err:
        build_parser().error(str(err))
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    try:
        result = train(config)
    except TrainingDiverged as err:
        raise SystemExit(f"error: {err}") from err
    if rank == 0 and result.losses:
        logger.info(
            "step %d: loss %.4f after %d tokens; metrics in %s",
            result.step,
            result.losses[-1],
            result.tokens,
            result.out_dir / "metrics.jsonl",
        )
    if result.length_generalization is not None:
        lg = result.length_generalization
        logger.info(
            "perplexity at 1x the window: %s; worst / best over lengths: %.3f; plot in %s",
            lg.at_1x,
            lg.degradation,
            result.out_dir / "length_generalization.png",
        )
    return result


if __name__ == "__main__":
    main()
