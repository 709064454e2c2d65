"""A TTT language model that behaves like any other `transformers` model.

`TTTConfig` and `TTTForCausalLM` compute the function of the authors' PyTorch model
(ttt-lm-pytorch): a Llama-style stack whose self-attention is replaced by a TTT layer (TTT-Linear
or TTT-MLP), in the Transformer or the Mamba backbone, with the paper's size presets in
`TTT_STANDARD_CONFIGS`; `ttt_helpers.convert` maps their checkpoints onto it. The model is registered with `AutoConfig` and
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

from . import checks, ops
from .compat import cache_kwargs, take_cache
from .fused_projections import project
from .layers import IMPLS, TTTMLP, CausalConv, Padding, TTTLayer, TTTLinear

LAYERS = {"linear": TTTLinear, "mlp": TTTMLP}  # ttt_layer_type -> layer class

# The paper's model sizes (Sun et al. 2024, Table of configurations); vocabulary as in its Llama tokenizer.
TTT_STANDARD_CONFIGS: dict[str, dict] = {
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_hidden_layers=24, num_attention_heads=16),
    "760m": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=32),
}


BACKBONES = {  # the paper's two backbones as the authors' three options
    "transformer": dict(pre_conv=False, share_qk=False, use_gate=False),
    "mamba": dict(pre_conv=True, share_qk=True, use_gate=True),
}


class TTTConfig(PretrainedConfig):
    """Configuration of `TTTForCausalLM`: the authors' options under their names and with their
    defaults (`TTTConfig()` is the 1b preset, `TTT_STANDARD_CONFIGS["1b"]`), plus two of ours.

    ttt_layer_type: "linear" (TTT-Linear) or "mlp" (TTT-MLP); mini_batch_size: tokens per inner
    step; ttt_base_lr: base inner learning rate (None: 1.0 for linear, 0.1 for mlp); rope_theta:
    base of the rotary embedding of XQ and XK at positions t mod mini_batch_size;
    max_position_embeddings: recorded only (RoPE never sees a position >= mini_batch_size).
    The Mamba backbone is three options: pre_conv (a residual x + conv(RMSNorm(x)) before the
    sequence norm, kernel conv_kernel), share_qk (one query projection through two convolutions,
    conv_q and conv_k; V not convolved) and use_gate (a GELU gate on the normed input).
    scan_checkpoint_group_size and pretraining_tp are accepted and recorded; they change memory
    or the order of sums, not the function.

    Ours: backbone, a short-hand: "transformer" (all three False) or "mamba" (all three True);
    None reads it off the three options ("custom" for a mix). ttt_impl: "auto" runs the TTT layers
    through the Triton kernels on CUDA (the training kernels when a gradient is needed) and through
    the reference ops otherwise, "kernel" or "reference" force one path.
    """

    model_type = "ttt"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        intermediate_size: int = 5504,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 32,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        pretraining_tp: int = 1,
        tie_word_embeddings: bool = True,
        rope_theta: float = 10000.0,
        use_gate: bool | None = None,
        share_qk: bool | None = None,
        ttt_layer_type: str = "linear",
        ttt_base_lr: float | None = 1.0,
        mini_batch_size: int = 16,
        pre_conv: bool | None = None,
        conv_kernel: int = 4,
        scan_checkpoint_group_size: int = 0,
        backbone: str | None = None,
        ttt_impl: str = "auto",
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
            ("max_position_embeddings", max_position_embeddings),
            ("pretraining_tp", pretraining_tp),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an int >= 1, got {value!r}")
        checks.integer("scan_checkpoint_group_size", scan_checkpoint_group_size, 0)
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
            )
        if (hidden_size // num_attention_heads) % 2:
            raise ValueError(f"hidden_size // num_attention_heads must be even for RoPE, got {hidden_size}")
        if ttt_layer_type not in LAYERS:
            raise ValueError(f"ttt_layer_type must be 'linear' or 'mlp', got {ttt_layer_type!r}")
        if ttt_impl not in IMPLS:
            raise ValueError(f"ttt_impl must be one of {IMPLS}, got {ttt_impl!r}")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (the SwiGLU feed-forward), got {hidden_act!r}")
        flags = resolve_backbone(backbone, pre_conv=pre_conv, share_qk=share_qk, use_gate=use_gate)
        if ttt_base_lr is None:
            ttt_base_lr = LAYERS[ttt_layer_type].default_base_lr
        ttt_base_lr = checks.positive("ttt_base_lr", ttt_base_lr)
        rope_theta = checks.positive("rope_theta", rope_theta)
        rms_norm_eps = checks.positive("rms_norm_eps", rms_norm_eps)
        initializer_range = checks.positive("initializer_range", initializer_range)
        checks.boolean("use_cache", use_cache)
        checks.boolean("tie_word_embeddings", tie_word_embeddings)
        if pad_token_id is not None and (
            isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab_size
        ):
            raise ValueError(f"pad_token_id must be None or a token id in [0, {vocab_size}), got {pad_token_id!r}")
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        self.ttt_layer_type, self.mini_batch_size, self.ttt_base_lr = ttt_layer_type, mini_batch_size, ttt_base_lr
        self.rope_theta, self.conv_kernel, self.ttt_impl = rope_theta, conv_kernel, ttt_impl
        self.pre_conv, self.share_qk, self.use_gate = flags["pre_conv"], flags["share_qk"], flags["use_gate"]
        self.backbone = next((name for name, f in BACKBONES.items() if f == flags), "custom")
        self.scan_checkpoint_group_size, self.pretraining_tp = scan_checkpoint_group_size, pretraining_tp
        self.rms_norm_eps, self.initializer_range, self.use_cache = rms_norm_eps, initializer_range, use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


def resolve_backbone(backbone: str | None, **flags: bool | None) -> dict[str, bool]:
    """The three backbone options (pre_conv, share_qk, use_gate) from the short-hand `backbone`
    and those given (None: not given). A given option that contradicts `backbone` is an error."""
    if backbone not in (None, "custom", *BACKBONES):
        raise ValueError(f"backbone must be 'transformer', 'mamba', 'custom' or None, got {backbone!r}")
    implied = BACKBONES.get(backbone, dict.fromkeys(flags, False))
    resolved = {}
    for name, value in flags.items():
        if value is None:
            value = implied[name]
        checks.boolean(name, value)
        if backbone in BACKBONES and value != implied[name]:
            raise ValueError(f"{name}={value} contradicts backbone={backbone!r}: pass backbone=None to mix options")
        resolved[name] = value
    return resolved


@dataclass
class TTTCache:
    """Everything a TTT model carries from one call to the next.

    states[i]: layer i's TTT state (*params, *grads[, qk]): the weights at the start of the current
    mini-batch, the gradient sums inside it and, with share_qk, the last conv_kernel - 1 query
    projections [B, k-1, C] that conv_q and conv_k read; conv_states[i]: the last conv_kernel - 1
    inputs of layer i's pre_conv [B, k-1, C] (None without pre_conv); seen_tokens: tokens read so
    far, padding included; starts: for a left-padded batch, how many of them were padding in each
    row (row i has read seen_tokens - starts[i] tokens); positions: None, or each row's position in
    its mini-batch as an int32 tensor [B] on the model's device, kept in step with seen_tokens by
    the model, so that a one-token step reads it there and not from the host (the CUDA-graph
    decoder keeps one; a left-padded batch decodes through it). Its size does not depend on seen_tokens.
    broken: None, or why the cache can no longer be continued (a call that failed part-way).
    """

    states: list[tuple[Tensor, ...]]
    conv_states: list[Tensor | None]
    seen_tokens: int = 0
    starts: list[int] | None = None  # left padding per row of a ragged batch (None: no padding)
    positions: Tensor | None = None
    broken: str | None = None  # why the cache may be half-updated (a call on it failed): None while usable
    # What generate() asks of a cache it is given: not a static KV cache to compile (the CUDA-graph
    # decoder of `kernels` captures decoding instead), every layer a recurrent state, its length.
    is_compileable: ClassVar[bool] = False

    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self.states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def row_positions(self, mini_batch_size: int) -> list[int]:
        """Each row's position in its mini-batch, from seen_tokens and starts (no device read)."""
        starts = self.starts or [0] * self.states[0][0].shape[0]
        return [(self.seen_tokens - s) % mini_batch_size for s in starts]

    def keep_positions(self, mini_batch_size: int) -> Tensor:
        """`positions`, made from `row_positions` if the cache has none yet, else refreshed in
        place (so a CUDA graph that reads it stays valid)."""
        values = torch.tensor(self.row_positions(mini_batch_size), dtype=torch.int32)
        if self.positions is None:
            self.positions = values.to(self.states[0][0].device)
        else:
            self.positions.copy_(values)
        return self.positions

    def detach(self) -> TTTCache:
        """The same state cut from the autograd graph (truncated backpropagation through time)."""
        return TTTCache(
            [tuple(t.detach() for t in s) for s in self.states],
            [None if c is None else c.detach() for c in self.conv_states],
            self.seen_tokens,
            self.starts,
            self.positions,
            self.broken,
        )

    def rows(self, index: Tensor, seen_tokens: int) -> TTTCache:
        """The cache of the rows `index` (copies), as if each had read `seen_tokens` tokens."""
        return TTTCache(
            [tuple(t[index] for t in s) for s in self.states],
            [None if c is None else c[index] for c in self.conv_states],
            seen_tokens,
        )

    @staticmethod
    def join(parts: list[tuple[list[int], TTTCache]], seen_tokens: int, starts: list[int]) -> TTTCache:
        """One cache from the caches of groups of rows: parts = [(row indices, their cache)]."""
        order = torch.tensor([i for rows, _ in parts for i in rows])
        inverse = torch.argsort(order)
        caches = [c for _, c in parts]

        def gather(tensors: list[Tensor]) -> Tensor:
            joined = torch.cat(tensors)
            return joined[inverse.to(joined.device)]

        states = [
            tuple(gather([c.states[j][k] for c in caches]) for k in range(len(s)))
            for j, s in enumerate(caches[0].states)
        ]
        convs = [
            None if c is None else gather([p.conv_states[j] for p in caches])
            for j, c in enumerate(caches[0].conv_states)
        ]
        return TTTCache(states, convs, seen_tokens, starts)

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        tensors = [t for s in self.states for t in s] + [c for c in self.conv_states if c is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


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
            one_token_per_row = cache.positions is not None and x.shape[1] == 1
            position = cache.positions if one_token_per_row else cache.seen_tokens % self.ttt.mini_batch_size
            y, cache.states[i], _ = self.ttt.forward_stream(h, cache.states[i], position, padding=padding)
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
            cache.seen_tokens += x.shape[1]
            if cache.positions is not None and x.shape[1] == 1:  # on the device: no host sync
                cache.positions.add_(1).remainder_(self.config.mini_batch_size)
            elif cache.positions is not None:
                cache.keep_positions(self.config.mini_batch_size)
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
        starts = self._left_padding(attention_mask, cache, x.shape[0], x.shape[1])
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

    def _left_padding(self, attention_mask: Tensor | None, cache: TTTCache | None, B: int, T: int) -> list[int] | None:
        """How many padding tokens start each row (None: no padding), from attention_mask [B, T] or
        [B, seen + T] and the cache's own record; refuses any other padding than a prompt's left padding."""
        seen = 0 if cache is None else cache.seen_tokens
        known = None if cache is None else cache.starts
        if attention_mask is None:
            return known
        checks.tensor("attention_mask", attention_mask, 2)
        if attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, seen + T):
            raise ValueError(
                f"attention_mask must have shape [{B}, {seen + T}] (every token so far) or [{B}, {T}], "
                f"got {list(attention_mask.shape)}"
            )
        mask = attention_mask.bool()
        if bool(mask.all()):  # the common case: one read of the mask
            if known is not None and attention_mask.shape[1] == seen + T:
                raise ValueError(
                    f"attention_mask has no padding, but the cache's rows started with {known} padding tokens"
                )
            return known
        if seen and not bool(mask[:, -T:].all()):
            raise ValueError("attention_mask: only the prompt (the first call) may be padded; later tokens must be 1s")
        if bool((mask.int().diff(dim=1) < 0).any()):
            raise ValueError("attention_mask must pad on the left (each row 0s, then 1s): pad prompts on the left")
        starts = (~mask).sum(dim=1).tolist()
        if max(starts) >= seen + T:
            raise ValueError("attention_mask: every row needs at least one token that is not padding")
        if seen and starts != known:
            raise ValueError(
                f"attention_mask's padding {starts} is not the cache's ({known}): the cache read those tokens"
            )
        return starts

    def _forward_ragged(self, x: Tensor, cache: TTTCache | None, starts: list[int], use_cache: bool):
        """A left-padded batch, each row exactly as it would run alone: the prompt in one call
        (`_prefill_padded`); one decoded token per row in one call, each row at its own position in
        its mini-batch (`TTTCache.positions`); longer later calls in groups of rows at the same
        position. -> (hidden states [B, T, C], 0 at padding; the cache or None)"""
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
            groups: dict[int, list[int]] = {}
            for i, start in enumerate(starts):
                groups.setdefault((seen - start) % b, []).append(i)
            hidden = x.new_zeros(B, T, self.config.hidden_size)
            parts = []
            for rows in groups.values():
                index = torch.tensor(rows, device=x.device)
                part = cache.rows(index, seen - starts[rows[0]])
                hidden[index] = self.model(x[index], part)
                parts.append((rows, part))
            joined = TTTCache.join(parts, seen + T, starts)
        if not keep:
            return hidden, None
        if cache is None:
            return hidden, joined
        cache.states, cache.conv_states, cache.seen_tokens, cache.starts = (
            joined.states, joined.conv_states, joined.seen_tokens, joined.starts,
        )  # fmt: skip
        if cache.positions is not None:
            cache.keep_positions(b)
        return hidden, cache

    def _prefill_padded(self, x: Tensor, starts: list[int]) -> tuple[Tensor, TTTCache]:
        """A left-padded prompt x: [B, T, C] (row i's first starts[i] tokens padding) in one call,
        each row as it would run alone. Row i's n_i tokens move to start at a multiple of the
        mini-batch size b, so that every row's whole mini-batches end at the same token and the
        rest of each row (n_i % b tokens) follows from position 0 of a mini-batch: whole
        mini-batches of padding before a row's tokens, some after them, none within. The padding
        changes nothing (`Padding`). -> (hidden states [B, T, C] in x's layout, 0 at padding; the
        cache, as if each row had read its own tokens after its padding)"""
        B, T, C = x.shape
        b, device = self.config.mini_batch_size, x.device
        lengths = [T - s for s in starts]
        whole = max(n // b for n in lengths)
        offsets = [(whole - n // b) * b for n in lengths]  # where each row's tokens start now
        L = whole * b + max(n % b for n in lengths)
        offset, length, start = (torch.tensor(v, device=device)[:, None] for v in (offsets, lengths, starts))
        t = torch.arange(L, device=device)
        mask = (t >= offset) & (t < offset + length)
        source = (t - offset + start).clamp(0, T - 1)  # [B, L]: where each token comes from in x
        aligned = x.gather(1, source[:, :, None].expand(-1, -1, C))
        cache = self.model.new_cache(B)
        out = self.model(aligned, cache, Padding(mask, (offset + length)[:, 0]))
        u = torch.arange(T, device=device)
        back = (u - start + offset).clamp(0, L - 1)  # [B, T]: where each token of x went
        hidden = out.gather(1, back[:, :, None].expand(-1, -1, C))
        hidden = torch.where((u >= start)[:, :, None], hidden, 0)
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
