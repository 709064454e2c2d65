"""Chapter 5's byte-level runs at GPU scale, shared by `train_gpu` and `model_distances`: the model's
shape, the settings every run shares, and its data (the plays as UTF-8 bytes)."""

from __future__ import annotations

from torch import Tensor

from ttt_helpers.train import TrainConfig, play_documents

WINDOW = 512
SHAPE = dict(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, mini_batch_size=16)
COMMON = dict(
    **SHAPE,
    tokenizer="bytes",
    doc_tokens=16384,
    window=WINDOW,
    batch_size=32,
    lr=1e-3,
    warmup_steps=30,
    weight_decay=0.1,
    grad_clip=1.0,
    seed=0,
    eval_lengths=20,
    eval_tokens_per_doc=20480,
    checkpoint_every=None,
    tensorboard=False,
    progress=False,
    precision="bf16",  # autocast for every run; the TTT states stay float32
)


def byte_plays() -> tuple[list[Tensor], list[Tensor]]:
    """Training documents (the training plays cut into 16,384 bytes) and the four held-out plays, whole."""
    return play_documents(TrainConfig(**{**COMMON, "eval_tokens_per_doc": None}))
