"""`TTTConfig`: the authors' options for a TTT language model under their names, the paper's size
presets (`TTT_STANDARD_CONFIGS`) and the two backbones as sets of those options (`BACKBONES`)."""

from __future__ import annotations

from transformers import PretrainedConfig

from .. import checks
from ..layers import IMPLS, TTTMLP, TTTLinear
from ..local_attention import check_hybrid

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
SIZES = (  # the options that are counts, each an int >= 1
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mini_batch_size",
    "conv_kernel",
    "max_position_embeddings",
    "pretraining_tp",
)


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
    the reference ops otherwise, "kernel" or "reference" force one path. attention_window >= 1 makes
    every layer a hybrid: softmax attention over the first attention_sinks tokens and the last
    attention_window tokens (rotary base rope_theta, absolute positions inside the window) added to
    the TTT branch before o_proj (`layers.TTTLayer`); 0, the default, is the authors' model.
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
        attention_window: int = 0,
        attention_sinks: int = 0,
        **kwargs,
    ) -> None:
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        self.ttt_layer_type, self.mini_batch_size, self.ttt_base_lr = ttt_layer_type, mini_batch_size, ttt_base_lr
        self.rope_theta, self.conv_kernel, self.ttt_impl = rope_theta, conv_kernel, ttt_impl
        self.pre_conv, self.share_qk, self.use_gate, self.backbone = pre_conv, share_qk, use_gate, backbone
        self.scan_checkpoint_group_size, self.pretraining_tp = scan_checkpoint_group_size, pretraining_tp
        self.rms_norm_eps, self.initializer_range, self.use_cache = rms_norm_eps, initializer_range, use_cache
        self.attention_window, self.attention_sinks = attention_window, attention_sinks
        self._check_and_resolve(pad_token_id, tie_word_embeddings)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _check_and_resolve(self, pad_token_id: int | None, tie_word_embeddings: bool) -> None:
        """Raise unless every option is valid; put in what None stands for (ttt_base_lr, the
        backbone's three options) and the backbone's name."""
        check_sizes(**{name: getattr(self, name) for name in SIZES})
        checks.integer("scan_checkpoint_group_size", self.scan_checkpoint_group_size, 0)
        check_heads(self.hidden_size, self.num_attention_heads)
        check_kinds(self.ttt_layer_type, self.ttt_impl, self.hidden_act)
        flags = resolve_backbone(self.backbone, pre_conv=self.pre_conv, share_qk=self.share_qk, use_gate=self.use_gate)
        if self.ttt_base_lr is None:
            self.ttt_base_lr = LAYERS[self.ttt_layer_type].default_base_lr
        for name in ("ttt_base_lr", "rope_theta", "rms_norm_eps", "initializer_range"):
            setattr(self, name, checks.positive(name, getattr(self, name)))
        checks.boolean("use_cache", self.use_cache)
        checks.boolean("tie_word_embeddings", tie_word_embeddings)
        check_pad_token(pad_token_id, self.vocab_size)
        self.pre_conv, self.share_qk, self.use_gate = flags["pre_conv"], flags["share_qk"], flags["use_gate"]
        self.backbone = next((name for name, f in BACKBONES.items() if f == flags), "custom")
        check_hybrid(self.attention_window, self.attention_sinks, self.share_qk, prefix="attention_")


def check_sizes(**sizes: int) -> None:
    """Raise unless every size (`SIZES`) is an int >= 1."""
    for field, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be an int >= 1, got {value!r}")


def check_heads(hidden_size: int, num_attention_heads: int) -> None:
    """Raise unless the heads split hidden_size evenly into heads of an even width (for RoPE)."""
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
        )
    if (hidden_size // num_attention_heads) % 2:
        raise ValueError(f"hidden_size // num_attention_heads must be even for RoPE, got {hidden_size}")


def check_kinds(ttt_layer_type: str, ttt_impl: str, hidden_act: str) -> None:
    """Raise unless the layer kind, the implementation and the activation are ones the model has."""
    if ttt_layer_type not in LAYERS:
        raise ValueError(f"ttt_layer_type must be 'linear' or 'mlp', got {ttt_layer_type!r}")
    if ttt_impl not in IMPLS:
        raise ValueError(f"ttt_impl must be one of {IMPLS}, got {ttt_impl!r}")
    if hidden_act != "silu":
        raise ValueError(f"hidden_act must be 'silu' (the SwiGLU feed-forward), got {hidden_act!r}")


def check_pad_token(pad_token_id: int | None, vocab_size: int) -> None:
    """Raise unless pad_token_id is None or a token id of the vocabulary."""
    if pad_token_id is not None and (
        isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab_size
    ):
        raise ValueError(f"pad_token_id must be None or a token id in [0, {vocab_size}), got {pad_token_id!r}")


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
