"""A TTT language model that behaves like any other `transformers` model.

`configuration.py`: `TTTConfig`, the authors' options, with the paper's size presets
(`TTT_STANDARD_CONFIGS`); `modeling.py`: `TTTForCausalLM` and its modules; `cache.py`: the
`TTTCache` that carries the TTT state between calls, and left padding; `convert.py`: the
authors' checkpoints and Llama-style models as a `TTTForCausalLM`. Importing the package
registers the model with `AutoConfig` and `AutoModelForCausalLM` (`model_type: "ttt"`).
"""

from .cache import TTTCache
from .configuration import BACKBONES, TTT_STANDARD_CONFIGS, TTTConfig, resolve_backbone
from .modeling import TTTForCausalLM, TTTModel

__all__ = [
    "BACKBONES",
    "TTT_STANDARD_CONFIGS",
    "TTTCache",
    "TTTConfig",
    "TTTForCausalLM",
    "TTTModel",
    "resolve_backbone",
]
