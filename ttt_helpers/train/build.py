"""What a run trains with: the model (new or pretrained), the AdamW optimizer, the learning-rate
schedule and the precision of the forward pass."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from .. import checks
from ..model import TTTConfig, TTTForCausalLM
from .config import TrainConfig


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """Keep transformers' save/load progress bars out of logs and notebooks."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_model(folder: str | Path) -> nn.Module:
    """The model saved in `folder` (any AutoModelForCausalLM), in float32."""
    with no_progress_bars():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def build_model(config: TrainConfig, vocab_size: int) -> nn.Module:
    """A new TTT model or Llama baseline of the configured shape (seeded), or the pretrained one."""
    checks.integer("vocab_size", vocab_size, 1)
    if config.from_pretrained is not None:
        model = load_model(config.from_pretrained)
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
            ttt_impl=config.ttt_impl,
            bos_token_id=None,
            eos_token_id=None,
        )
    )


def bf16_autocast(config: TrainConfig, device: torch.device) -> bool:
    """Whether the forward pass and the loss run under bfloat16 autocast on `device`, as
    `config.precision` says ("auto": on CUDA); else in float32. TTT layers keep their state in
    float32 under autocast: the kernels read 16-bit inputs with a float32 state, the reference ops
    compute in the state's dtype."""
    return config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr` over warmup_steps, then cosine decay to lr * min_lr_ratio at max_steps."""
    checks.integer("step", step, 0)
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on matrices, none on vectors and scalars."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))
