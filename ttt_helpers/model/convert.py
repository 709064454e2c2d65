"""Other layouts as our `TTTForCausalLM`: the authors' checkpoints (ttt-lm-pytorch) both ways, and a
Llama-style causal LM converted into TTT layers (`from_llama`).

The authors' parameters map one to one onto ours; only names and two shapes differ (their inner
learning-rate gate is [H, 1, C] and [H, 1], ours a Linear(C, H)). Their config keys are ours:
`TTTConfig` takes the authors' options under their names. `from_official` builds our model
from their state dict and config, `to_official` goes back, and `TTTForCausalLM.from_pretrained`
on a folder saved by their code goes through `from_official`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .. import checks, ops
from ..layers import TTTLayer
from ..transplant import decoder_layers, ttt_from_attention
from .configuration import TTTConfig
from .modeling import TTTForCausalLM

# The authors' config keys with their defaults; a key missing from their config.json means this.
OFFICIAL_DEFAULTS: dict = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5504,
    num_hidden_layers=24,
    num_attention_heads=32,
    hidden_act="silu",
    max_position_embeddings=2048,
    initializer_range=0.02,
    rms_norm_eps=1e-6,
    use_cache=False,
    pad_token_id=None,
    bos_token_id=1,
    eos_token_id=2,
    pretraining_tp=1,
    tie_word_embeddings=True,
    rope_theta=10000.0,
    use_gate=False,
    share_qk=False,
    ttt_layer_type="linear",
    ttt_base_lr=1.0,
    mini_batch_size=16,
    pre_conv=False,
    conv_kernel=4,
    scan_checkpoint_group_size=0,
)
# keys of a saved config.json that describe the file, not the model
BOOKKEEPING = (
    "architectures",
    "model_type",
    "transformers_version",
    "_name_or_path",
    "auto_map",
    "dtype",
    "torch_dtype",
)
SEQ = "seq_modeling_block"  # their name of the TTT layer inside a block


def _layer_names(config: TTTConfig) -> list[tuple[str, str]]:
    """(their name, our name) of every parameter of one block, relative to the block."""
    names = [(f"{SEQ}.{p}.weight", f"ttt.{p}.weight") for p in ("q_proj", "v_proj", "o_proj")]
    if not config.share_qk:
        names.append((f"{SEQ}.k_proj.weight", "ttt.k_proj.weight"))
    else:
        names += [(f"{SEQ}.{c}.{w}", f"ttt.{c}.{w}") for c in ("conv_q", "conv_k") for w in ("weight", "bias")]
    if config.use_gate:
        names.append((f"{SEQ}.g_proj.weight", "ttt.g_proj.weight"))
    names += [
        (f"{SEQ}.learnable_ttt_lr_weight", "ttt.lr_gate.weight"),
        (f"{SEQ}.learnable_ttt_lr_bias", "ttt.lr_gate.bias"),
        (f"{SEQ}.learnable_token_idx", "ttt.token_idx_offset"),
        (f"{SEQ}.ttt_norm_weight", "ttt.ln_weight"),
        (f"{SEQ}.ttt_norm_bias", "ttt.ln_bias"),
        (f"{SEQ}.post_norm.weight", "ttt.post_norm.weight"),
        (f"{SEQ}.post_norm.bias", "ttt.post_norm.bias"),
    ]
    if config.ttt_layer_type == "linear":  # our TTT-Linear calls its state W0, b0; theirs W1, b1
        names += [(f"{SEQ}.W1", "ttt.W0"), (f"{SEQ}.b1", "ttt.b0")]
    else:
        names += [(f"{SEQ}.{p}", f"ttt.{p}") for p in ("W1", "b1", "W2", "b2")]
    names += [(f"mlp.{p}.weight", f"mlp.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")]
    names += [("seq_norm.weight", "seq_norm.weight"), ("ffn_norm.weight", "ffn_norm.weight")]
    if config.pre_conv:
        names += [("conv.norm.weight", "pre_conv.norm.weight")]
        names += [(f"conv.conv.{w}", f"pre_conv.conv.{w}") for w in ("weight", "bias")]
    return names


def name_pairs(config: TTTConfig) -> list[tuple[str, str]]:
    """(their name, our name) of every parameter of a model of `config` (lm_head included)."""
    pairs = [("model.embed_tokens.weight", "model.embed_tokens.weight"), ("model.norm.weight", "model.norm.weight")]
    for i in range(config.num_hidden_layers):
        pairs += [(f"model.layers.{i}.{a}", f"model.layers.{i}.{b}") for a, b in _layer_names(config)]
    return pairs + [("lm_head.weight", "lm_head.weight")]


def _to_ours(name: str, value: Tensor) -> Tensor:
    if name.endswith("learnable_ttt_lr_weight"):  # [H, 1, C] -> [H, C]
        return value.reshape(value.shape[0], -1)
    if name.endswith("learnable_ttt_lr_bias"):  # [H, 1] -> [H]
        return value.reshape(-1)
    return value


def _to_theirs(name: str, value: Tensor) -> Tensor:
    if name.endswith("learnable_ttt_lr_weight"):
        return value.reshape(value.shape[0], 1, -1)
    if name.endswith("learnable_ttt_lr_bias"):
        return value.reshape(-1, 1)
    return value


def _build(config: TTTConfig, weights: dict[str, Tensor], dtype: torch.dtype, unset: str) -> TTTForCausalLM:
    """A `TTTForCausalLM` of `config` that holds `weights` (our names; the head may be left to the
    tied embeddings), built without a random initialisation of what they overwrite, its buffers
    made in `dtype`. Raises a ValueError that starts with `unset` if a parameter is left unset."""
    with torch.device("meta"):
        model = TTTForCausalLM(config)
    model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    for module in model.modules():  # a buffer, not in a state dict: 1/(1..b) in the weights' dtype
        if isinstance(module, TTTLayer):
            module.token_idx_base = ops.default_token_idx(module.mini_batch_size, dtype=dtype)
    leftover = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if leftover:
        raise ValueError(f"{unset}: {leftover[:5]}")
    return model


def config_from_official(config_dict: dict) -> TTTConfig:
    """Our config for the authors' config dict (their defaults fill missing keys)."""
    if not isinstance(config_dict, dict):
        raise TypeError(f"config_dict must be a dict, got {type(config_dict).__name__}")
    if config_dict.get("model_type", "ttt") != "ttt":
        raise ValueError(f"config_dict must describe a TTT model (model_type 'ttt'), got {config_dict['model_type']!r}")
    given = {k: v for k, v in config_dict.items() if k not in BOOKKEEPING}
    return TTTConfig(**{**OFFICIAL_DEFAULTS, **given})


def from_official(state_dict: dict[str, Tensor], config_dict: dict) -> TTTForCausalLM:
    """Our `TTTForCausalLM` with the weights of a state dict in the authors' layout.

    state_dict: their `TTTForCausalLM.state_dict()` (lm_head.weight may be missing when tied);
    config_dict: their `TTTConfig.to_dict()` or config.json. Every parameter is used exactly once;
    a missing or unexpected one is an error. The model is in float32 unless the weights are not.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    config = config_from_official(config_dict)
    pairs = name_pairs(config)
    theirs = {k: v for k, v in state_dict.items() if not k.endswith((".token_idx", ".inv_freq"))}  # buffers
    if config.tie_word_embeddings or "lm_head.weight" not in theirs:
        if "lm_head.weight" not in theirs and not config.tie_word_embeddings:
            raise ValueError("state_dict lacks lm_head.weight and the config does not tie it to the embeddings")
        head, embed = theirs.get("lm_head.weight"), theirs.get("model.embed_tokens.weight")
        if head is not None and embed is not None and not torch.equal(head, embed):
            raise ValueError(
                "state_dict's lm_head.weight differs from model.embed_tokens.weight, but the config ties them "
                "(tie_word_embeddings=True), which would drop the head: pass tie_word_embeddings=False in "
                "config_dict to keep it"
            )
        pairs = pairs[:-1]
        theirs.pop("lm_head.weight", None)
    missing = [a for a, _ in pairs if a not in theirs]
    unexpected = sorted(set(theirs) - {a for a, _ in pairs})
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not match the authors' layout for this config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    dtype = theirs["model.embed_tokens.weight"].dtype
    ours = {b: _to_ours(a, theirs[a]) for a, b in pairs}
    return _build(config, ours, dtype, "state_dict left parameters unset").to(dtype)


def to_official(model: TTTForCausalLM) -> tuple[dict[str, Tensor], dict]:
    """The authors' state dict and config dict of our `model` (their `TTTForCausalLM` loads them)."""
    if not isinstance(model, TTTForCausalLM):
        raise TypeError(f"model must be a TTTForCausalLM, got {type(model).__name__}")
    config = model.config
    ours = model.state_dict()
    state_dict = {a: _to_theirs(a, ours[b]).detach().clone() for a, b in name_pairs(config)}
    config_dict = {key: getattr(config, key) for key in OFFICIAL_DEFAULTS}
    config_dict["model_type"] = "ttt"
    return state_dict, config_dict


def is_official_folder(folder: str | Path) -> bool:
    """Whether `folder` holds a checkpoint saved by the authors' code (their parameter names)."""
    names = _weight_names(Path(folder))
    return any(f".{SEQ}." in n for n in names)


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    return files or sorted(folder.glob("pytorch_model*.bin"))


def _weight_names(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    names: list[str] = []
    for f in _weight_files(folder):
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as handle:
                names += list(handle.keys())
        else:
            names += list(torch.load(f, map_location="cpu", weights_only=True))
    return names


def load_official_folder(folder: str | Path) -> TTTForCausalLM:
    """`from_official` on a folder saved by the authors' code (config.json and the weights)."""
    folder = Path(folder)
    config_dict = json.loads((folder / "config.json").read_text())
    state_dict: dict[str, Tensor] = {}
    for f in _weight_files(folder):
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict.update(load_file(str(f)))
        else:
            state_dict.update(torch.load(f, map_location="cpu", weights_only=True))
    return from_official(state_dict, config_dict)


# What `from_llama` takes beside the Llama, with its defaults; every other field follows the Llama.
CONVERSION: dict[str, float] = {"mini_batch_size": 16, "ttt_base_lr": 1.0, "attention_window": 0, "attention_sinks": 0}
# The fields a TTTConfig shares, by name and meaning, with a Llama config.
LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def conversion(**options: float) -> dict[str, float]:
    """`CONVERSION` with `options` in place of its defaults; an option it does not name is refused."""
    unknown = sorted(set(options) - set(CONVERSION))
    if unknown:
        raise TypeError(f"from_llama has no option {', '.join(unknown)}; its options are {', '.join(CONVERSION)}")
    return {**CONVERSION, **options}


def config_from_llama(llama_config, **options: float) -> TTTConfig:
    """The `TTTConfig` of a TTT-Linear model in the Transformer backbone shaped like a Llama config:
    width, depth, heads, feed-forward width, vocabulary, norm epsilon, rotary base, tied embeddings
    and special tokens carried over; grouped key/value heads become full heads. attention_window
    and attention_sinks (>= 1: hybrid layers) need the Llama's plain rotary embedding (no scaling).
    options: those of `CONVERSION` (mini_batch_size, ttt_base_lr, attention_window, attention_sinks), by name."""
    options = conversion(**options)
    rope = getattr(llama_config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(llama_config, "rope_theta", None))
    if theta is None:
        raise ValueError("llama_config has no rotary base (rope_parameters['rope_theta'] or rope_theta)")
    rope_type = rope.get("rope_type", (getattr(llama_config, "rope_scaling", None) or {}).get("rope_type", "default"))
    if options["attention_window"] and rope_type != "default":
        raise ValueError(f"attention_window: the hybrid layer rotates as Llama's default RoPE, not {rope_type!r}")
    head_dim = getattr(llama_config, "head_dim", None) or llama_config.hidden_size // llama_config.num_attention_heads
    if head_dim * llama_config.num_attention_heads != llama_config.hidden_size:
        raise ValueError(
            f"llama_config: num_attention_heads x head_dim ({llama_config.num_attention_heads} x {head_dim}) "
            f"must equal hidden_size ({llama_config.hidden_size}) for a TTT layer"
        )
    return TTTConfig(
        **{name: getattr(llama_config, name) for name in LLAMA_FIELDS},
        rms_norm_eps=float(llama_config.rms_norm_eps),
        rope_theta=float(theta),
        tie_word_embeddings=bool(llama_config.tie_word_embeddings),
        backbone="transformer",
        ttt_layer_type="linear",
        **options,
    )


def from_llama(llama: torch.nn.Module, **options: float) -> TTTForCausalLM:
    """A `TTTForCausalLM` made from a Llama-style causal LM: every self-attention becomes a TTT-Linear
    layer (Transformer backbone) whose q, k, v and o projections are the attention's, each grouped
    key/value head repeated for the query heads that share it (`transplant.ttt_from_attention`,
    seed = layer index); the embeddings, the norms, the feed-forward blocks and the head are copied.

    What the conversion cannot keep: absolute positions (the TTT layer rotates XQ and XK by
    t mod mini_batch_size, so the rotary embedding now encodes positions inside a mini-batch only),
    and attention itself (a TTT layer's output is XQ + LN(f(XQ)) through a LayerNorm, not a softmax
    average of values): before distillation the converted model is far worse than the original.
    The result is on the CPU in the Llama's dtype; `llama` is not changed.

    options, by name, with their defaults in `CONVERSION`: mini_batch_size (16) and ttt_base_lr (1.0)
    of the TTT layers; attention_window >= 1 gives hybrid layers (`TTTConfig`): each keeps the attention over the first
    attention_sinks tokens and the last attention_window, and its TTT branch starts silent (the
    output norm's weight and bias at zero), so the converted model is, before any training,
    the Llama with a StreamingLLM cache.
    """
    checks.module("llama", llama)
    decoder = decoder_layers(llama)
    inner = llama.model
    if not all(hasattr(inner, name) for name in ("embed_tokens", "norm")) or not hasattr(llama, "lm_head"):
        raise ValueError("llama must be a Llama-style causal LM (model.embed_tokens, model.norm, lm_head)")
    config = config_from_llama(llama.config, **options)
    weights = {"model.embed_tokens.weight": inner.embed_tokens.weight, "model.norm.weight": inner.norm.weight}
    if not config.tie_word_embeddings:
        weights["lm_head.weight"] = llama.lm_head.weight
    for i, theirs in enumerate(decoder):
        ours = f"model.layers.{i}."
        weights[ours + "seq_norm.weight"] = theirs.input_layernorm.weight
        weights[ours + "ffn_norm.weight"] = theirs.post_attention_layernorm.weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            weights[ours + f"mlp.{name}.weight"] = getattr(theirs.mlp, name).weight
        ttt = ttt_from_attention(
            theirs.self_attn, mini_batch_size=config.mini_batch_size, seed=i, rope_theta=config.rope_theta
        )
        weights.update({ours + "ttt." + name: value for name, value in ttt.state_dict().items()})
        if config.attention_window:  # the TTT branch starts silent
            for name in ("post_norm.weight", "post_norm.bias"):
                weights[ours + "ttt." + name] = torch.zeros_like(weights[ours + "ttt." + name])
    weights = {k: v.detach().clone() for k, v in weights.items()}
    dtype = inner.embed_tokens.weight.dtype
    return _build(config, weights, dtype, "llama left parameters of the TTT model unset").eval()
