"""The settings of a training run: `TrainConfig`, with the type and range of every field checked.

A config is built from keyword arguments, a mapping (`from_dict`) or a YAML/JSON file
(`from_file`); each field carries the help text the command line shows for it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import checks
from ..layers import IMPLS
from ..model import TTT_STANDARD_CONFIGS

MODEL_KINDS = ("ttt-linear", "ttt-mlp", "transformer")
PRECISIONS = ("auto", "bf16", "fp32")


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
    ttt_impl: str = _opt("TTT layers: auto (the Triton kernels on CUDA), kernel or reference (the PyTorch ops)", "auto")
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
    precision: str = _opt(
        "bf16: the forward pass and the loss under bfloat16 autocast, on CUDA or the CPU (weights, optimizer "
        "and the TTT states stay float32); fp32: float32 throughout; auto: bf16 on CUDA, else fp32",
        "auto",
    )
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
        checks.one_of("model", self.model, MODEL_KINDS)
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
        checks.one_of("ttt_impl", self.ttt_impl, IMPLS)
        checks.one_of("precision", self.precision, PRECISIONS)
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
            try:
                values = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"config file {path} is not valid JSON: {err}") from err
        elif path.suffix in (".yaml", ".yml"):
            if importlib.util.find_spec("yaml") is None:
                raise ValueError(f"reading {path} needs PyYAML (pip install pyyaml); or write the config as JSON")
            import yaml

            try:
                values = yaml.safe_load(text) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from err
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
