"""The training loop: `train` runs a whole run (data, model, logging, checkpoints, evaluation),
`Trainer` one process's optimizer steps.

A TTT model passes its state from one segment of a document to the next (`carry_state`) and
starts from its learned initial state only where a row begins a new document or every
`cache_reset_interval` segments; gradients stop at segment boundaries (truncated
backpropagation through time).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checks, metrics
from ..compat import cache_kwargs, output_cache
from ..model import TTTCache, TTTForCausalLM
from .build import bf16_autocast, build_model, build_optimizer, learning_rate
from .checkpoints import (
    check_out_dir,
    clear_out_dir,
    newest_intact_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .distributed import init_distributed, rank_and_world_size
from .logger import RunLogger
from .stream import Batch, SegmentStream, load_tokenizer, play_documents

logger = logging.getLogger(__name__)


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


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm of a step is not finite (nan or inf): the run cannot go on."""


class Trainer:
    """One process's part of a run: the model, optimizer, data stream and carried TTT caches.

    Built new from the config, or, with `config.resume`, from the newest checkpoint in
    `out_dir` that can be read (unreadable newer ones are set aside with a warning), so that the
    following steps are exactly those of an uninterrupted run. Under torchrun (a process group
    is initialized) the model is wrapped in DistributedDataParallel and process `rank` reads its
    own rows of documents. `bf16`: whether the forward pass and the loss run under bfloat16
    autocast (`TrainConfig.precision`); the backward pass follows the forward's dtypes.
    """

    def __init__(
        self, config: TrainConfig, train_docs: Sequence[Tensor], tokenizer=None, device: torch.device | str = "cpu"
    ) -> None:
        self.config, self.tokenizer, self.device = config, tokenizer, torch.device(device)
        self.rank, self.world = rank_and_world_size()
        self.out_dir = Path(config.out_dir)
        self.stream = SegmentStream(  # this process's rows of the batch
            train_docs, config.window, config.batch_size, seed=config.seed, reset_interval=config.cache_reset_interval
        )
        saved = None
        if config.resume:
            checkpoint, saved = newest_intact_checkpoint(self.out_dir, self.rank, self.device)
            model = saved["model"]
        else:
            model = build_model(config, 256 if tokenizer is None else len(tokenizer))
        for i, doc in enumerate(train_docs):
            checks.token_ids(f"train_docs[{i}]", doc, model.config.vocab_size)
        self.model = model.to(self.device).train()
        self.bf16 = bf16_autocast(config, self.device)
        self.state_passing = config.state_passing and isinstance(model, TTTForCausalLM)
        if config.state_passing and not self.state_passing:
            logger.warning(
                "state_passing applies to TTT models only: the %s reads every segment from scratch",
                type(model).__name__,
            )
        self.optimizer = build_optimizer(self.model, config)
        self.step, self.tokens, self.cache = 0, 0, None
        if saved is not None:
            restore_checkpoint(self, checkpoint, saved)
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
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
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
        """Write a checkpoint of this step (see `checkpoints.save_checkpoint`); returns its folder."""
        return save_checkpoint(self)


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
    _check_train_arguments(config, callback)
    device, started = init_distributed(config)
    run_log = None
    try:
        rank = rank_and_world_size()[0]
        check_out_dir(config)
        train_docs, val_docs, tokenizer = _documents(config, train_docs, val_docs, tokenizer)
        trainer = Trainer(config, train_docs, tokenizer, device)
        model = trainer.model
        if config.eval_after and rank == 0 and val_docs:
            for i, doc in enumerate(val_docs):
                checks.token_ids(f"val_docs[{i}]", doc, model.config.vocab_size)
            metrics.evaluation_lengths(val_docs, train_window=config.window, n=config.eval_lengths, name="val_docs")
        clear_out_dir(config, rank)
        trainer.out_dir.mkdir(parents=True, exist_ok=True)
        if trainer.rank == 0:
            run_log = RunLogger(trainer.out_dir, config)
            run_log.log(_start_record(trainer))
        start_step, losses = trainer.step, _run_steps(trainer, run_log, callback)
        model.eval()
        result = TrainResult(model, losses, start_step, trainer.step, trainer.tokens, trainer.out_dir, None, config)
        if config.eval_after and run_log is not None and val_docs:
            lg = evaluate_length_generalization(model, [d.to(device) for d in val_docs], config, trainer.out_dir)
            result.length_generalization = lg
            run_log.log(_eval_record(trainer.step, lg))
        return result
    finally:
        if run_log is not None:
            run_log.close()
        if started:
            dist.destroy_process_group()


def _check_train_arguments(config: TrainConfig, callback: Callable | None) -> None:
    """The config's type, the callback, and the package that W&B logging needs."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be a function callback(step, metrics) or None, got {type(callback).__name__}")
    if (config.wandb or config.wandb_offline) and importlib.util.find_spec("wandb") is None:
        raise ValueError("wandb logging (wandb or wandb_offline) needs the wandb package: pip install wandb")


def _documents(
    config: TrainConfig, train_docs: Sequence[Tensor] | None, val_docs: Sequence[Tensor] | None, tokenizer
) -> tuple[Sequence[Tensor], list[Tensor], Any]:
    """The training and validation documents (by default the plays, with the tokenizer loaded
    here) and the tokenizer; val_docs checked, [] where there are none."""
    if train_docs is None:
        tokenizer = load_tokenizer(config.tokenizer)
        train_docs, plays_val = play_documents(config, tokenizer)
        val_docs = plays_val if val_docs is None else val_docs
    if isinstance(val_docs, (list, tuple)) and not val_docs:
        val_docs = []
    elif val_docs is not None:
        val_docs = metrics.check_token_documents(val_docs, "val_docs")
    return train_docs, val_docs, tokenizer


def _start_record(trainer: Trainer) -> dict[str, Any]:
    """The metrics.jsonl record of a run's start: the model, its size, the processes, the config."""
    return {
        "step": trainer.step,
        "event": "start",
        "model": type(trainer.model).__name__,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "world_size": trainer.world,
        "state_passing": trainer.state_passing,
        "precision": "bf16" if trainer.bf16 else "fp32",
        "config": trainer.config.to_dict(),
    }


def _run_steps(
    trainer: Trainer, run_log: RunLogger | None, callback: Callable[[int, dict[str, Any]], None] | None
) -> list[float]:
    """Train up to config.max_steps, logging, checkpointing and calling back as the config says,
    with a progress bar on process 0 at a terminal. -> the loss of every step taken"""
    from tqdm import tqdm

    config = trainer.config
    start_tokens, start_time, losses = trainer.tokens, time.perf_counter(), []
    bar = tqdm(
        total=config.max_steps,
        initial=trainer.step,
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
    return losses


def _eval_record(step: int, lg: metrics.LengthGeneralization) -> dict[str, Any]:
    """The metrics.jsonl record of the evaluation after training."""
    return {
        "step": step,
        "event": "eval",
        "train_window": lg.train_window,
        "lengths": [r.length for r in lg.rows],
        "perplexities": [r.perplexity for r in lg.rows],
        "eval/perplexity_at_1x": lg.at_1x,
        "eval/degradation": lg.degradation,
    }
