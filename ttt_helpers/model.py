"""A TTT language model that behaves like any other `transformers` model.

`TTTConfig` and `TTTForCausalLM` follow the paper's architecture: a Llama-style stack whose
self-attention is replaced by a TTT layer (TTT-Linear or TTT-MLP), with the paper's size
presets in `TTT_STANDARD_CONFIGS`. The model is registered with `AutoConfig` and
`AutoModelForCausalLM`, saves and loads as safetensors, and `generate()` works with a
`TTTCache` that carries the TTT state, so each decoded token costs the same at any context length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import checks
from .compat import cache_kwargs, take_cache
from .layers import IMPLS, TTTMLP, TTTLayer, TTTLinear

LAYERS = {"linear": TTTLinear, "mlp": TTTMLP}  # ttt_layer_type -> layer class

# The paper's model sizes (Sun et al. 2024, Table of configurations); vocabulary as in its Llama tokenizer.
TTT_STANDARD_CONFIGS: dict[str, dict] = {
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_hidden_layers=24, num_attention_heads=16),
    "760m": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=32),
}


class TTTConfig(PretrainedConfig):
    """Configuration of `TTTForCausalLM`.

    ttt_layer_type: "linear" (TTT-Linear) or "mlp" (TTT-MLP); mini_batch_size: tokens per inner
    step; ttt_base_lr: base inner learning rate (default 1.0 for linear, 0.1 for mlp);
    backbone: "transformer" (norm -> TTT -> residual, norm -> SwiGLU -> residual) or "mamba"
    (a causal depthwise convolution before the TTT layer and a GELU output gate); ttt_impl:
    "auto" runs the TTT layers through the Triton kernels on CUDA (the training kernels when a
    gradient is needed) and through the reference ops otherwise, "kernel" or "reference" force one path.
    """

    model_type = "ttt"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        intermediate_size: int = 2048,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        ttt_layer_type: str = "linear",
        mini_batch_size: int = 16,
        ttt_base_lr: float | None = None,
        backbone: str = "transformer",
        conv_kernel: int = 4,
        ttt_impl: str = "auto",
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = True,
        **kwargs,
    ) -> None:
        for field, value in (
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
            ("mini_batch_size", mini_batch_size),
            ("conv_kernel", conv_kernel),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an int >= 1, got {value!r}")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
            )
        if ttt_layer_type not in LAYERS:
            raise ValueError(f"ttt_layer_type must be 'linear' or 'mlp', got {ttt_layer_type!r}")
        if ttt_impl not in IMPLS:
            raise ValueError(f"ttt_impl must be one of {IMPLS}, got {ttt_impl!r}")
        if backbone not in ("transformer", "mamba"):
            raise ValueError(f"backbone must be 'transformer' or 'mamba', got {backbone!r}")
        if ttt_base_lr is None:
            ttt_base_lr = LAYERS[ttt_layer_type].default_base_lr
        ttt_base_lr = checks.positive("ttt_base_lr", ttt_base_lr)
        rms_norm_eps = checks.positive("rms_norm_eps", rms_norm_eps)
        initializer_range = checks.positive("initializer_range", initializer_range)
        checks.boolean("use_cache", use_cache)
        checks.boolean("tie_word_embeddings", tie_word_embeddings)
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.ttt_layer_type, self.mini_batch_size, self.ttt_base_lr = ttt_layer_type, mini_batch_size, ttt_base_lr
        self.backbone, self.conv_kernel, self.ttt_impl = backbone, conv_kernel, ttt_impl
        self.rms_norm_eps, self.initializer_range, self.use_cache = rms_norm_eps, initializer_range, use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


@dataclass
class TTTCache:
    """Everything a TTT model carries from one call to the next.

    states[i]: layer i's TTT state (*params, *grads): the weights at the start of the current
    mini-batch and the gradient sums inside it; conv_states[i]: the last conv_kernel - 1 inputs
    of layer i's convolution [B, k-1, C] (None without the Mamba backbone); seen_tokens: tokens
    read so far. Its size does not depend on seen_tokens.
    """

    states: list[tuple[Tensor, ...]]
    conv_states: list[Tensor | None]
    seen_tokens: int = 0
    # What generate() asks of a cache it is given: not a static KV cache to compile (the CUDA-graph
    # decoder of `kernels` captures decoding instead), every layer a recurrent state, its length.
    is_compileable: ClassVar[bool] = False

    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self.states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def detach(self) -> TTTCache:
        """The same state cut from the autograd graph (truncated backpropagation through time)."""
        return TTTCache(
            [tuple(t.detach() for t in s) for s in self.states],
            [None if c is None else c.detach() for c in self.conv_states],
            self.seen_tokens,
        )

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        tensors = [t for s in self.states for t in s] + [c for c in self.conv_states if c is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


class CausalConv(nn.Module):
    """Depthwise causal convolution over time; the state holds the last k - 1 inputs."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(channels, channels, kernel, groups=channels)

    def initial_state(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.kernel - 1, x.shape[2])

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, T, C], state: [B, k-1, C] -> (y: [B, T, C], new state)."""
        padded = torch.cat([state, x], dim=1)
        y = self.conv(padded.transpose(1, 2)).transpose(1, 2)
        return y, padded[:, padded.shape[1] - (self.kernel - 1) :]


class SwiGLU(nn.Module):
    """The Llama feed-forward block: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TTTBlock(nn.Module):
    """One residual block: [conv ->] TTT layer, then the SwiGLU feed-forward, each pre-normed."""

    def __init__(self, config: TTTConfig) -> None:
        super().__init__()
        C, mamba = config.hidden_size, config.backbone == "mamba"
        layer_cls = LAYERS[config.ttt_layer_type]
        self.seq_norm = nn.RMSNorm(C, eps=config.rms_norm_eps)
        self.conv = CausalConv(C, config.conv_kernel) if mamba else None
        self.ttt = layer_cls(
            C,
            config.num_attention_heads,
            config.mini_batch_size,
            config.ttt_base_lr,
            use_gate=mamba,
            impl=config.ttt_impl,
        )
        self.ffn_norm = nn.RMSNorm(C, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(C, config.intermediate_size)

    def forward(self, x: Tensor, cache: TTTCache | None, i: int) -> Tensor:
        """x: [B, T, C]. With a cache, continue layer i's state from it and write it back."""
        h = self.seq_norm(x)
        if self.conv is not None:
            conv_state = cache.conv_states[i] if cache is not None else None
            h, conv_state = self.conv(h, self.conv.initial_state(h) if conv_state is None else conv_state)
            if cache is not None:
                cache.conv_states[i] = conv_state
        if cache is None:
            y, _ = self.ttt(h)
        else:
            position = cache.seen_tokens % self.ttt.mini_batch_size
            y, cache.states[i], _ = self.ttt.forward_stream(h, cache.states[i], position)
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
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def new_cache(self, batch_size: int) -> TTTCache:
        """An empty cache: every layer at its learned initial state."""
        return TTTCache(
            [block.ttt.initial_stream_state(batch_size) for block in self.layers], [None] * len(self.layers)
        )

    def check_cache(self, cache: object, batch_size: int) -> None:
        """Raise unless `cache` is a TTTCache of this model for `batch_size` rows."""
        if not isinstance(cache, TTTCache):
            raise TypeError(
                f"cache must be a TTTCache (model.model.new_cache(batch_size), or the one a forward returned), "
                f"got {type(cache).__name__}"
            )
        if len(cache.states) != len(self.layers):
            raise ValueError(f"cache has states for {len(cache.states)} layers, the model has {len(self.layers)}")
        rows = cache.states[0][0].shape[0]
        if rows != batch_size:
            raise ValueError(f"cache holds {rows} rows, the input has {batch_size}: a cache continues one batch")

    def forward(self, inputs_embeds: Tensor, cache: TTTCache | None) -> Tensor:
        x = inputs_embeds
        for i, block in enumerate(self.layers):
            x = block(x, cache, i)
        if cache is not None:
            cache.seen_tokens += x.shape[1]
        return self.norm(x)


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
        installed transformers' name (`compat.output_cache` reads it on any release). Padding is not
        supported: every token, padded or not, would train the state.
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
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask must be all ones: a TTT state cannot skip padded tokens")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cache is None and use_cache:
            cache = self.model.new_cache(x.shape[0])
        elif cache is not None:
            self.model.check_cache(cache, x.shape[0])
        hidden = self.model(x, cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **cache_kwargs(cache))

    def prepare_inputs_for_generation(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = True, **kwargs
    ) -> dict:
        """Feed only the tokens the cache has not read yet; the mask goes through, so padding is refused."""
        cache = take_cache(kwargs)
        if cache is not None:
            input_ids = input_ids[:, cache.seen_tokens :]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs | cache_kwargs(cache)


AutoConfig.register(TTTConfig.model_type, TTTConfig)
AutoModelForCausalLM.register(TTTConfig, TTTForCausalLM)
