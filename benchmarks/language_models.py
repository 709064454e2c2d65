"""The language models the training benchmarks compare, built by name at one shape (the 125M shape
of the paper by default) with SmolLM2's vocabulary:

  llama            a Llama (RoPE, SDPA attention, every head its own keys and values)
  ttt-linear       TTT-Linear in the Transformer backbone
  ttt-linear-m     TTT-Linear in the Mamba backbone (the paper's "TTT-Linear (M)")
  ttt-mlp-m        TTT-MLP in the Mamba backbone
  ttt-linear-m-lr0 the control: ttt-linear-m with every TTT layer's base_lr set to 0 after it is
                   built, so eta = 0 and the inner state never leaves its learned W0
  deltanet         flash-linear-attention's DeltaNet, heads of 128
  gated-deltanet   flash-linear-attention's GatedDeltaNet, heads of 128 (its gated backward kernel is
                   known to give wrong gradients on Hopper GPUs with Triton 3.4 to 3.7.0)
"""

from __future__ import annotations

import torch

from ttt_helpers.model import TTTConfig, TTTForCausalLM

ARCHITECTURES = ("llama", "ttt-linear", "ttt-linear-m", "ttt-mlp-m", "ttt-linear-m-lr0", "deltanet", "gated-deltanet")
VOCAB = 49152
TTT_MODELS = {  # name -> (layer kind, backbone)
    "ttt-linear": ("linear", "transformer"),
    "ttt-linear-m": ("linear", "mamba"),
    "ttt-mlp-m": ("mlp", "mamba"),
    "ttt-linear-m-lr0": ("linear", "mamba"),
}
DRY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def build(name: str, shape: dict, vocab: int, context: int) -> torch.nn.Module:
    """The model `name` (one of ARCHITECTURES) of the given shape (hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads), tied embeddings, on the CPU in float32."""
    if name not in ARCHITECTURES:
        raise ValueError(f"name must be one of {ARCHITECTURES}, got {name!r}")
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        heads = shape["num_attention_heads"]
        config = LlamaConfig(**shape, num_key_value_heads=heads, vocab_size=vocab, tie_word_embeddings=True,
                             max_position_embeddings=context, attn_implementation="sdpa")  # fmt: skip
        return LlamaForCausalLM(config)
    if name in ("deltanet", "gated-deltanet"):
        from fla import models

        prefix = "GatedDeltaNet" if name == "gated-deltanet" else "DeltaNet"
        C = shape["hidden_size"]
        config = getattr(models, prefix + "Config")(
            hidden_size=C, num_hidden_layers=shape["num_hidden_layers"], num_heads=max(1, C // 128),
            intermediate_size=shape["intermediate_size"], vocab_size=vocab, tie_word_embeddings=True,
        )  # fmt: skip
        return getattr(models, prefix + "ForCausalLM")(config)
    kind, backbone = TTT_MODELS[name]
    model = TTTForCausalLM(TTTConfig(**shape, vocab_size=vocab, ttt_layer_type=kind, backbone=backbone))
    if name.endswith("-lr0"):
        for block in model.model.layers:
            block.ttt.base_lr = 0.0
    return model
