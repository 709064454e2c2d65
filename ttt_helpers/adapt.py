"""LoRA test-time adaptation of any Hugging Face causal LM.

The base model is frozen and small LoRA adapters (a short-term memory) are trained on a context
with the next-token loss for a few AdamW steps: the inner loop of test-time training, applied to
a pretrained model. `adapted` wraps it so the adapter is always removed afterwards and the base
weights are bitwise what they were.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from . import checks

DEFAULT_TARGETS = ("q_proj", "v_proj")
Batch = dict[str, Tensor]
_Snapshot = tuple[dict[str, bool], dict[str, bool]]


@dataclass
class AdaptResult:
    """What `adapt_lora` returns.

    model: the base model wrapped with the trained adapter (eval mode, ready to generate).
    losses: the training loss before each AdamW step, `steps * chunks` floats in order.
    seconds: wall time of the whole adaptation (adapter creation and all steps).
    trainable_params / total_params: LoRA parameters / all parameters, LoRA included.
    chunks: how many chunk batches the text was cut into (1 for a text that fits).
    """

    model: PeftModel
    losses: list[float]
    seconds: float
    trainable_params: int
    total_params: int
    chunks: int
    _snapshot: _Snapshot = field(repr=False)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params

    def unload(self) -> nn.Module:
        """Remove the adapter (peft `unload`, not merge) and restore every module's train/eval
        mode and every parameter's requires_grad. Returns the base model, bitwise as before."""
        return _remove_adapter(self.model, self._snapshot)


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's `nn.Linear` modules: the valid LoRA targets."""
    checks.module("model", model)
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def _token_rows(tokenizer, text: str | Sequence[str]) -> list[list[int]]:
    """Token ids of each row of `text` (a string is one row), as the tokenizer encodes it by default."""
    if not callable(tokenizer):
        raise TypeError(
            f"tokenizer must be a Hugging Face tokenizer (callable on a string), got {type(tokenizer).__name__}"
        )
    if not isinstance(text, (str, list, tuple)):
        raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
    rows = [text] if isinstance(text, str) else list(text)
    if not rows:
        raise ValueError("text must be a non-empty string or a non-empty list of strings, got an empty list")
    ids = []
    for i, row in enumerate(rows):
        name = "text" if isinstance(text, str) else f"text[{i}]"
        if not isinstance(row, str) or not row.strip():
            raise ValueError(f"{name} must be a non-empty string, got {row!r}")
        tokens = list(tokenizer(row)["input_ids"])
        if len(tokens) < 2:
            raise ValueError(f"{name} must encode to at least 2 tokens (one next-token target), got {len(tokens)}")
        ids.append(tokens)
    return ids


def chunk_batches(rows: list[list[int]], chunk_tokens: int) -> list[Batch]:
    """Cut every row into consecutive chunks of `chunk_tokens` tokens; batch k holds chunk k of
    every row that has one (of at least 2 tokens), right-padded.

    Each batch: input_ids, attention_mask, labels, all [rows_k, T_k] with T_k <= chunk_tokens;
    padding has attention 0 and label -100. A chunk starts without the previous one in its
    context, so the first token of each chunk is never a target.
    """
    checks.integer("chunk_tokens", chunk_tokens, 2)
    if not rows or not all(isinstance(r, (list, tuple)) and r for r in rows):
        raise ValueError("rows must be a non-empty list of non-empty lists of token ids")
    n_chunks = max(math.ceil(len(r) / chunk_tokens) for r in rows)
    batches = []
    for k in range(n_chunks):
        pieces = [r[k * chunk_tokens : (k + 1) * chunk_tokens] for r in rows]
        pieces = [p for p in pieces if len(p) >= 2]
        if not pieces:
            continue
        width = max(len(p) for p in pieces)
        ids = torch.zeros(len(pieces), width, dtype=torch.long)  # pad id 0: masked, its value never matters
        mask = torch.zeros(len(pieces), width, dtype=torch.long)
        for i, p in enumerate(pieces):
            ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return batches


def _take_snapshot(model: nn.Module) -> _Snapshot:
    """Train/eval flag of every module and requires_grad of every parameter, by name."""
    modes = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    return modes, grads


def _remove_adapter(peft_model: PeftModel, snapshot: _Snapshot) -> nn.Module:
    """Unload (not merge) the adapter and restore the modes and requires_grad flags. -> base model"""
    base = peft_model.unload()
    modes, grads = snapshot
    for name, module in base.named_modules():
        module.training = modes[name]
    for name, param in base.named_parameters():
        param.requires_grad_(grads[name])
    return base


def _check_bare(model: nn.Module) -> None:
    """A module without a peft adapter attached."""
    if isinstance(model, PeftModel):
        raise ValueError("model already carries a peft adapter: unload it first")
    checks.module("model", model)
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            "model still has a LoRA adapter attached from an earlier adapt_lora call (a re-run cell?): "
            "remove it with `result.unload()` on that call's result (or use `with adapted(...)`, which always "
            "removes it), or load the model again"
        )


def _targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """target_modules as a checked list of last names of the model's linear layers."""
    valid = linear_module_names(model)
    if not isinstance(target_modules, (str, list, tuple)):
        raise TypeError(f"target_modules must be a list of names from {valid}, got {type(target_modules).__name__}")
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unknown = [t for t in targets if t not in valid]
    if not targets or unknown:
        raise ValueError(f"target_modules must be a non-empty list of names from {valid}, got {target_modules!r}")
    return targets


def _checked_batches(
    model: nn.Module, tokenizer, text: str | Sequence[str], target_modules: Sequence[str], chunk_tokens: int | None
) -> list[Batch]:
    """Check the targets and the text against the model; the text's chunk batches (`chunk_batches`)."""
    _targets(model, target_modules)
    if chunk_tokens is None:
        window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        chunk_tokens = window or 2**62  # no known window: every row is one chunk
    checks.integer("chunk_tokens", chunk_tokens, 2)
    rows = _token_rows(tokenizer, text)
    vocab = checks.model_vocab_size(model)
    for i, row in enumerate(rows):
        name = "text" if isinstance(text, str) else f"text[{i}]"
        if vocab is not None and not all(0 <= t < vocab for t in row):
            bad = next(t for t in row if not 0 <= t < vocab)
            raise ValueError(
                f"{name} encodes to token id {bad}, outside the model's vocabulary [0, {vocab}): a tokenizer of another model?"
            )
    batches = chunk_batches(rows, chunk_tokens)
    if getattr(getattr(model, "config", None), "model_type", None) == "ttt":
        # a TTT model refuses padding in a mask (its state would read it); right padding after a
        # row's tokens changes none of that row's predictions (causal) and its labels are -100
        batches = [{k: v for k, v in b.items() if k != "attention_mask"} for b in batches]
    return batches


def _attach(
    model: nn.Module, rank: int, alpha: float, target_modules: Sequence[str], seed: int
) -> tuple[PeftModel, _Snapshot]:
    """Seed torch, attach a fresh LoRA adapter (peft freezes every base parameter). -> (peft model, snapshot)"""
    snapshot = _take_snapshot(model)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=_targets(model, target_modules),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft asks transformers a deprecated question about gradient checkpointing; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    return peft_model, snapshot


def _checked_settings(
    steps: int, lr: float, rank: int, seed: int, alpha: float | None, callback: Callable | None
) -> float:
    """Check `adapt_lora`'s numbers and callback; returns the LoRA alpha (default 2 * rank)."""
    checks.integer("steps", steps, 1)
    checks.positive("lr", lr)
    checks.integer("rank", rank, 1)
    checks.integer("seed", seed)
    alpha = 2 * rank if alpha is None else checks.positive("alpha", alpha)
    if callback is not None and not callable(callback):
        raise TypeError(
            f"callback must be a function callback(step, peft_model) or None, got {type(callback).__name__}"
        )
    return alpha


def _train_adapter(
    peft_model: PeftModel,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    steps: int,
    callback: Callable[[int, PeftModel], None] | None,
) -> tuple[list[float], float]:
    """`steps` AdamW steps on each chunk batch in order, the callback after each step in eval mode
    without gradients; the model is left in eval mode. -> (losses, seconds spent in the callback)"""
    device = next(peft_model.parameters()).device
    losses, callback_seconds = [], 0.0
    peft_model.train()
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        for _ in range(steps):
            loss = peft_model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if callback is not None:
                tick = time.perf_counter()
                peft_model.eval()
                with torch.no_grad():
                    callback(len(losses), peft_model)
                peft_model.train()
                callback_seconds += time.perf_counter() - tick
    peft_model.eval()
    return losses, callback_seconds


def adapt_lora(
    model: nn.Module,
    tokenizer,
    text: str | Sequence[str],
    *,
    steps: int = 30,
    lr: float = 1e-3,
    rank: int = 8,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    chunk_tokens: int | None = None,
    seed: int = 0,
    callback: Callable[[int, PeftModel], None] | None = None,
    alpha: float | None = None,
) -> AdaptResult:
    """Freeze `model`, attach LoRA adapters and train only them on `text` with AdamW.

    The defaults (30 steps at lr 1e-3, rank 8 on q_proj and v_proj) come from measuring how
    reliably a new one-sentence fact is stored (`benchmarks.lora_recall`, whose results
    benchmarks/README.md and chapter 2 give). Fewer steps forget less of everything else.

    text: one string, or a list of strings fed together as the rows of one batch (right-padded).
      Each row starts from an empty context, so no row can copy from another (copies of a fact
      concatenated in one string can be predicted from the earlier copies instead of being
      stored). Identical rows give the same gradient as one row: rows help when they differ,
      e.g. several facts or several phrasings of one.
    chunk_tokens: rows longer than this (default: the model's context window) are cut into
      chunks, learned in order (streaming): `steps` AdamW steps on the batch of first chunks,
      then `steps` on the second chunks, and so on, with one optimizer throughout. So
      `len(losses) == steps * chunks`.
    rank: LoRA rank r (no dropout); target_modules: last names of the linear layers
      that get adapters (see `linear_module_names`). alpha: the LoRA alpha, default 2r: the
      adapter's output is scaled by alpha / r, 2 at every rank by default (with AdamW that does not
      make a step's effect independent of r: chapter 2). `seed` seeds torch before the adapter is
      initialised. The model is changed in place (peft injects the adapter layers): remove the
      adapter with `result.unload()`, or use the `adapted` context manager which does it for you.
    callback(step, peft_model): called after every AdamW step (step counts from 1), with the model
      in eval mode and gradients off, to measure recall along the way; its time is not counted
      in `seconds`. An exception from it stops the adaptation and removes the adapter.
    """
    _check_bare(model)
    alpha = _checked_settings(steps, lr, rank, seed, alpha, callback)
    batches = _checked_batches(model, tokenizer, text, target_modules, chunk_tokens)
    start = time.perf_counter()
    peft_model, snapshot = _attach(model, rank, alpha, target_modules, seed)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    try:
        losses, callback_seconds = _train_adapter(peft_model, optimizer, batches, steps, callback)
    except BaseException:
        _remove_adapter(peft_model, snapshot)  # a failed adaptation leaves the model as it found it
        raise
    return AdaptResult(
        model=peft_model,
        losses=losses,
        seconds=time.perf_counter() - start - callback_seconds,
        trainable_params=sum(p.numel() for p in trainable),
        total_params=sum(p.numel() for p in peft_model.parameters()),
        chunks=len(batches),
        _snapshot=snapshot,
    )


def adapter_gradient(
    model: nn.Module,
    tokenizer,
    text: str | Sequence[str],
    *,
    rank: int = 8,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
    alpha: float | None = None,
) -> Tensor:
    """The gradient of the next-token loss on `text` with respect to the adapter that `adapt_lora`
    starts from with the same rank, targets, seed and alpha, flattened. -> [trainable params] float32

    It sets the direction of the first AdamW step: with no history yet, AdamW moves each parameter
    by the learning rate times the sign of its gradient (up to eps), whatever the scale of the loss.
    Before that step B = 0, so only the entries of the B matrices have a nonzero gradient. The text
    is taken as adapt_lora takes its first batch (one string is one row; a list gives rows). The
    adapter is removed again: the model is left bitwise as it was.
    """
    _check_bare(model)
    checks.integer("rank", rank, 1)
    checks.integer("seed", seed)
    alpha = 2 * rank if alpha is None else checks.positive("alpha", alpha)
    batch = _checked_batches(model, tokenizer, text, target_modules, None)[0]
    peft_model, snapshot = _attach(model, rank, alpha, target_modules, seed)
    try:
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        device = next(model.parameters()).device
        peft_model.train()
        with torch.enable_grad():
            loss = peft_model(**{k: v.to(device) for k, v in batch.items()}).loss
            grads = torch.autograd.grad(loss, trainable)
        return torch.cat([g.detach().float().reshape(-1).cpu() for g in grads])
    finally:
        _remove_adapter(peft_model, snapshot)


@contextmanager
def adapted(model: nn.Module, tokenizer, text: str | Sequence[str], **kwargs) -> Iterator[AdaptResult]:
    """`with adapted(model, tokenizer, text, steps=...) as result:` yields `adapt_lora`'s result;
    use `result.model` inside.

    Keyword arguments go to `adapt_lora`. On leaving the block, also when it raises, the adapter
    is unloaded (not merged), so every base parameter is bitwise what it was, and each module's
    train/eval mode and each parameter's requires_grad are restored.
    """
    result = adapt_lora(model, tokenizer, text, **kwargs)
    try:
        yield result
    finally:
        result.unload()


def greedy_answer(model: nn.Module, tokenizer, prompt: str, *, max_new_tokens: int = 12) -> str:
    """Greedy continuation of `prompt` (encoded as the tokenizer does by default), new text only."""
    checks.module("model", model)
    checks.string("prompt", prompt)
    checks.integer("max_new_tokens", max_new_tokens, 1)
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)  # [1, T]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def answer_nll(model: nn.Module, tokenizer, prompt: str, answer: str) -> float:
    """Mean negative log-likelihood (nats per token) of `answer` right after `prompt`.

    A graded view of recall: it falls as the model comes to expect the answer, before greedy
    decoding produces it. The answer is encoded without special tokens.
    """
    checks.module("model", model)
    checks.string("prompt", prompt)
    checks.string("answer", answer)
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if not prompt_ids or not answer_ids:
        raise ValueError(f"prompt and answer must both encode to at least one token, got {prompt!r} and {answer!r}")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + answer_ids], device=device)  # [1, P + A]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]  # [A, V]: predictions of the answer
    return torch.nn.functional.cross_entropy(logits.float(), ids[0, len(prompt_ids) :]).item()


def weights_checksum(model: nn.Module) -> str:
    """SHA-256 of the state dict (names, dtypes, shapes and raw bytes): equal iff bitwise equal."""
    checks.module("model", model)
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def activation_bytes(model: nn.Module, input_ids: Tensor) -> int:
    """Bytes that autograd keeps for the backward of the next-token loss on input_ids [B, T]: the
    activations a training step holds at its peak, each storage counted once and the model's
    parameters not counted. One forward with the model's own requires_grad flags, no backward:
    a frozen model without an adapter keeps nothing."""
    checks.module("model", model)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be a [B, T] tensor of token ids with T >= 2, got {input_ids!r:.80}")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    del loss  # frees the graph and everything it kept
    return sum(kept.values())
