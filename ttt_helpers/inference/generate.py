"""Streaming generation that keeps the state: `stream_generate` yields the text of each token as
it is sampled and leaves the cache (TTT state or KV cache) ready to continue, and `Chat` keeps one
cache across the turns of a conversation.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers import DynamicCache

from .. import checks, data
from ..compat import cache_kwargs
from ..model import TTTForCausalLM


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
    continues the same text; a generator stopped early (`close()`, a `break`) has read every token
    it yielded. temperature 0 is greedy decoding.
    """
    checks.module("model", model)
    checks.string("prompt", prompt, empty=True)
    checks.integer("max_new_tokens", max_new_tokens, 1)
    checks.real("temperature", temperature, 0)
    checks.optional_integer("top_k", top_k, 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    ids = data.encode(prompt, tokenizer)
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
            inputs = torch.tensor([[token]], device=device)
            if piece:
                try:
                    yield piece
                except GeneratorExit:  # the caller stopped: the cache reads the token just yielded
                    model(input_ids=inputs, use_cache=True, **cache_kwargs(cache))
                    raise
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
