"""The modules of the TTT language model: `TTTForCausalLM` and what it is built of.

`TTTForCausalLM` computes the function of the authors' PyTorch model (ttt-lm-pytorch): a
Llama-style stack whose self-attention is replaced by a TTT layer (TTT-Linear or TTT-MLP), in the
Transformer or the Mamba backbone (`TTTConfig`). It is registered with `AutoConfig` and
`AutoModelForCausalLM`, saves and loads as safetensors, and `generate()` works with a `TTTCache`
that carries the TTT state, so each decoded token costs the same at any context length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import checks, ops
from ..compat import cache_kwargs, take_cache
from ..layers import IMPLS, CausalConv, Padding, TTTLayer, project
from .cache import Alignment, TTTCache, left_padding
from .configuration import LAYERS, TTTConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, x: [..., C]. The normalisation runs in float32 and is
    cast back to x's dtype before the weight multiplies it, as in the authors' model (and Llama's),
    so a float64 model matches theirs exactly and a bf16 one normalises in float32."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class PreConv(nn.Module):
    """The Mamba backbone's convolution branch: conv(RMSNorm(x)), added to x by the block."""

    def __init__(self, channels: int, kernel: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(channels, eps)
        self.conv = CausalConv(channels, kernel)

    def forward(self, x: Tensor, state: Tensor | None, padding: Padding | None = None) -> tuple[Tensor, Tensor]:
        """x: [B, T, C], state: [B, k-1, C] (the last normed inputs; None: zeros) -> (conv output, new
        state); with `padding` the convolution reads zeros at padded tokens."""
        if padding is None:
            return self.conv(self.norm(x), state)
        return self.conv(self.norm(x) * padding.mask[:, :, None].to(x.dtype), state, padding.ends)


class SwiGLU(nn.Module):
    """The Llama feed-forward block: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.fused: tuple[Tensor, Tensor | None] | None = None  # gate and up as one product (FusedProjections)

    def input_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The products that read the block's input: gate_proj, up_proj."""
        return self.gate_proj, self.up_proj

    def forward(self, x: Tensor) -> Tensor:
        gate, up = project(x, self.input_projections(), self.fused)
        return self.down_proj(F.silu(gate) * up)


class TTTBlock(nn.Module):
    """One residual block: [x + conv(norm(x)) ->] x + TTT(norm(x)), then x + SwiGLU(norm(x))."""

    def __init__(self, config: TTTConfig) -> None:
        super().__init__()
        C = config.hidden_size
        layer_cls = LAYERS[config.ttt_layer_type]
        self.pre_conv = PreConv(C, config.conv_kernel, config.rms_norm_eps) if config.pre_conv else None
        self.seq_norm = RMSNorm(C, config.rms_norm_eps)
        self.ttt = layer_cls(
            C,
            config.num_attention_heads,
            config.mini_batch_size,
            config.ttt_base_lr,
            use_gate=config.use_gate,
            impl=config.ttt_impl,
            share_qk=config.share_qk,
            conv_kernel=config.conv_kernel,
            rope_theta=config.rope_theta,
            window=config.attention_window,
            sinks=config.attention_sinks,
            attention_theta=config.rope_theta,
        )
        self.ffn_norm = RMSNorm(C, config.rms_norm_eps)
        self.mlp = SwiGLU(C, config.intermediate_size)

    def forward(self, x: Tensor, cache: TTTCache | None, i: int, padding: Padding | None = None) -> Tensor:
        """x: [B, T, C]. With a cache, continue layer i's states from it and write them back;
        `padding` (with a new cache only): the tokens that change nothing (see `Padding`)."""
        if self.pre_conv is not None:
            dx, conv_state = self.pre_conv(x, None if cache is None else cache.conv_states[i], padding)
            if cache is not None:
                cache.conv_states[i] = conv_state
            x = x + dx
        h = self.seq_norm(x)
        if cache is None:
            y, _ = self.ttt(h)
        else:
            position = cache.position(x.shape[1], self.ttt.mini_batch_size)
            start = None if self.ttt.local is None else cache.start(x.shape[1])
            y, cache.states[i], _ = self.ttt.forward_stream(h, cache.states[i], position, padding=padding, start=start)
        x = x + y
        return x + self.mlp(self.ffn_norm(x))


class TTTPreTrainedModel(PreTrainedModel):
    config_class = TTTConfig
    base_model_prefix = "model"
    _no_split_modules = ["TTTBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, TTTLayer):
            base = ops.default_token_idx(module.mini_batch_size, dtype=module.token_idx_base.dtype)
            init.copy_(module.token_idx_base, base)  # a buffer, not in checkpoints: made again on loading
            if module.rope_table is not None:  # likewise
                init.copy_(module.rope_table, module.rotary_table(module.rope_table.device))
            std = self.config.initializer_range
            for name, p in module.named_parameters(recurse=False):
                if name in ("W0", "W1", "W2"):
                    init.normal_(p, mean=0.0, std=std)
                elif name == "ln_weight":
                    init.ones_(p)
                else:  # b0, b1, b2, ln_bias, token_idx_offset
                    init.zeros_(p)


class TTTModel(TTTPreTrainedModel):
    """Embeddings, the stack of `TTTBlock`s and the final norm. Returns hidden states [B, T, C]."""

    def __init__(self, config: TTTConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(TTTBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def new_cache(self, batch_size: int) -> TTTCache:
        """An empty cache: every layer at its learned initial state, every convolution at zeros."""
        w = self.embed_tokens.weight
        C = self.config.hidden_size
        convs = [
            None if block.pre_conv is None else w.new_zeros(batch_size, self.config.conv_kernel - 1, C)
            for block in self.layers
        ]
        return TTTCache([block.ttt.initial_stream_state(batch_size) for block in self.layers], convs)

    def check_cache(self, cache: object, batch_size: int) -> None:
        """Raise unless `cache` is a TTTCache of this model for `batch_size` rows."""
        if not isinstance(cache, TTTCache):
            raise TypeError(
                f"cache must be a TTTCache (model.model.new_cache(batch_size), or the one a forward returned), "
                f"got {type(cache).__name__}"
            )
        if cache.broken is not None:
            raise ValueError(f"cache is unusable: {cache.broken}; start a new one (model.model.new_cache(batch_size))")
        if len(cache.states) != len(self.layers):
            raise ValueError(f"cache has states for {len(cache.states)} layers, the model has {len(self.layers)}")
        rows = cache.states[0][0].shape[0]
        if rows != batch_size:
            raise ValueError(f"cache holds {rows} rows, the input has {batch_size}: a cache continues one batch")
        if len(cache.conv_states) != len(self.layers):
            raise ValueError(
                f"cache has conv_states for {len(cache.conv_states)} layers, the model has {len(self.layers)}"
            )
        C, k = self.config.hidden_size, self.config.conv_kernel
        for i, (block, state, conv) in enumerate(zip(self.layers, cache.states, cache.conv_states)):
            params = [(rows, *p.shape) for p in block.ttt.initial_params()]
            want = params + params + ([(rows, k - 1, C)] if block.ttt.share_qk else [])
            if block.ttt.local is not None:
                want += [tuple(t.shape) for t in block.ttt.local.initial_cache(block.ttt.ln_weight[:, 0], rows)]
            got = [tuple(t.shape) for t in state]
            if got != want:
                raise ValueError(
                    f"cache does not fit this model: layer {i}'s state has shapes {got}, the model's {want} "
                    "(a cache of another model?)"
                )
            want_conv = None if block.pre_conv is None else (rows, k - 1, C)
            if (None if conv is None else tuple(conv.shape)) != want_conv:
                raise ValueError(
                    f"cache does not fit this model: layer {i}'s convolution state has shape "
                    f"{None if conv is None else list(conv.shape)}, the model's {want_conv} (a cache of another model?)"
                )

    def forward(self, inputs_embeds: Tensor, cache: TTTCache | None, padding: Padding | None = None) -> Tensor:
        """inputs_embeds: [B, T, C] -> hidden states [B, T, C], continuing `cache` (updated in place)
        if given; `padding`: see `Padding` (a new cache only). A call that fails (an error, a
        KeyboardInterrupt) leaves the cache as it was or, where the decode kernel may have updated
        its states in place, marks it unusable (`TTTCache.broken`): never half-updated."""
        if cache is None:
            x = inputs_embeds
            for i, block in enumerate(self.layers):
                x = block(x, None, i, padding)
            return self.norm(x)
        saved = list(cache.states), list(cache.conv_states), cache.seen_tokens
        try:
            x = inputs_embeds
            for i, block in enumerate(self.layers):
                x = block(x, cache, i, padding)
            out = self.norm(x)
            cache.advance(x.shape[1], self.config.mini_batch_size)
            return out
        except BaseException as error:
            if self._updates_in_place(inputs_embeds):
                cache.broken = (
                    f"a call on it failed ({type(error).__name__}) after the decode kernel may have updated it"
                )
            else:
                cache.states[:], cache.conv_states[:], cache.seen_tokens = saved
                if cache.positions is not None:
                    cache.keep_positions(self.config.mini_batch_size)
            raise

    def _updates_in_place(self, x: Tensor) -> bool:
        """Whether a call on x: [B, T, C] may run the decode kernel, which updates the TTT states in place."""
        return x.shape[1] == 1 and any(
            b.ttt.impl == "kernel" or (b.ttt.impl == "auto" and x.is_cuda) for b in self.layers
        )


class TTTForCausalLM(TTTPreTrainedModel, GenerationMixin):
    """A TTT language model: `TTTModel` plus a language-model head tied to the embeddings."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TTTConfig) -> None:
        super().__init__(config)
        self.model = TTTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.tie_weights()  # post_init of some 5.x releases (5.0) leaves a model built on the meta device untied

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def set_ttt_impl(self, impl: str) -> None:
        """Switch every TTT layer (and the config) to `impl`: "auto", "kernel" or "reference"."""
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.config.ttt_impl = impl
        for block in self.model.layers:
            block.ttt.impl = impl

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> TTTForCausalLM:
        """As `PreTrainedModel.from_pretrained`; a local folder saved by the authors' code
        (ttt-lm-pytorch: their parameter names) is read through `convert.from_official`."""
        from . import convert  # convert imports this module

        if convert.is_official_folder(pretrained_model_name_or_path):
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            if isinstance(dtype, str) and dtype != "auto":  # "float32", as transformers accepts it
                if not isinstance(getattr(torch, dtype, None), torch.dtype):
                    raise ValueError(
                        f"dtype must be a torch.dtype, 'auto' or a dtype's name like 'float32', got {dtype!r}"
                    )
                dtype = getattr(torch, dtype)
            model = convert.load_official_folder(pretrained_model_name_or_path)
            if isinstance(dtype, torch.dtype):
                model = model.to(dtype)
            return model.eval()
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model brings its own cache, a TTTCache

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: TTTCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: TTTCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids: [B, T] -> logits [B, T, V]; labels: [B, T] (shifted inside, -100 ignored).

        With `cache` (a TTTCache; `past_key_values` is its name before transformers 5.24, and either
        is accepted) the tokens continue that sequence and the cache is updated in place;
        `use_cache=True` without one starts a new cache. The output carries the cache under the
        installed transformers' name (`compat.output_cache` reads it on any release).

        attention_mask: [B, T], or [B, seen + T] covering every token read so far (as generate()
        passes it). Left padding in the prompt (each row 0s, then 1s) gives each row what it would
        get alone: the prompt runs in one call, each row's tokens moved so that its mini-batches
        start at its first token, the padding changing nothing (`_prefill_padded`); a decoded token
        per row runs in one call, each row at its own position in its mini-batch; longer later
        calls run in groups of rows at the same position (at most mini_batch_size groups). The logits at padded positions are 0. Right padding, padding after
        the prompt, and labels with padding are refused.
        """
        cache = take_cache({"cache": cache, "past_key_values": past_key_values})
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            # reading the ids back would break the capture of a CUDA graph: check their values outside one
            capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
            checks.token_ids("input_ids", input_ids, self.config.vocab_size, dims=2, values=not capturing)
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if x.dim() != 3 or x.shape[1] == 0:
            name = "input_ids" if inputs_embeds is None else "inputs_embeds"
            raise ValueError(f"{name} must hold at least one token per row, got shape {list(x.shape)}")
        if cache is not None:
            self.model.check_cache(cache, x.shape[0])
        starts = left_padding(attention_mask, cache, x.shape[0], x.shape[1])
        if starts is not None and labels is not None:
            raise ValueError("labels: training on a padded batch is not supported (the loss would read the padding)")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if starts is not None:
            hidden, cache = self._forward_ragged(x, cache, starts, use_cache)
        else:
            if cache is None and use_cache:
                cache = self.model.new_cache(x.shape[0])
            hidden = self.model(x, cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **cache_kwargs(cache))

    def _forward_ragged(
        self, x: Tensor, cache: TTTCache | None, starts: list[int], use_cache: bool
    ) -> tuple[Tensor, TTTCache | None]:
        """A left-padded batch, each row exactly as it would run alone: the prompt in one call
        (`_prefill_padded`); one decoded token per row in one call, each row at its own position in
        its mini-batch (`TTTCache.positions`); longer later calls in groups of rows at the same
        position. -> (hidden states [B, T, C], 0 at padding; the cache or None)"""
        if self.config.attention_window:
            raise ValueError(
                "attention_mask: a hybrid model (attention_window >= 1) reads unpadded batches only; "
                "run rows of different lengths one at a time"
            )
        B, T, _ = x.shape
        seen, b = (0 if cache is None else cache.seen_tokens), self.config.mini_batch_size
        if seen and T == 1:
            if cache.positions is None:
                cache.keep_positions(b)
            return self.model(x, cache), cache
        keep = use_cache or cache is not None  # a cache given is continued, as without padding
        if seen == 0:
            hidden, joined = self._prefill_padded(x, starts)
        else:
            hidden = x.new_zeros(B, T, self.config.hidden_size)
            parts = cache.by_position(b)
            for rows, part in parts:
                index = torch.tensor(rows, device=x.device)
                hidden[index] = self.model(x[index], part)
            joined = TTTCache.join(parts, seen + T, starts)
        if not keep:
            return hidden, None
        if cache is None:
            return hidden, joined
        cache.take(joined, b)
        return hidden, cache

    def _prefill_padded(self, x: Tensor, starts: list[int]) -> tuple[Tensor, TTTCache]:
        """A left-padded prompt x: [B, T, C] (row i's first starts[i] tokens padding) in one call,
        each row as it would run alone (laid out by an `Alignment`). -> (hidden states [B, T, C] in
        x's layout, 0 at padding; the cache, as if each row had read its own tokens after its padding)"""
        B, T, _ = x.shape
        layout = Alignment.of(starts, T, self.config.mini_batch_size, x.device)
        cache = self.model.new_cache(B)
        hidden = layout.restore(self.model(layout.align(x), cache, layout.padding))
        cache.seen_tokens, cache.starts = T, list(starts)
        return hidden, cache

    def prepare_inputs_for_generation(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = True, **kwargs
    ) -> dict:
        """Feed only the tokens the cache has not read yet; the mask goes through (left padding works)."""
        cache = take_cache(kwargs)
        if cache is not None:
            input_ids = input_ids[:, cache.seen_tokens :]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs | cache_kwargs(cache)


AutoConfig.register(TTTConfig.model_type, TTTConfig)
AutoModelForCausalLM.register(TTTConfig, TTTForCausalLM)
