"""`ttt_helpers.model.convert` under the name the chapters import: the authors' checkpoints and
Llama-style models as a `TTTForCausalLM`."""

from .model.convert import (
    config_from_llama,
    config_from_official,
    from_llama,
    from_official,
    is_official_folder,
    load_official_folder,
    name_pairs,
    to_official,
)

__all__ = [
    "config_from_llama",
    "config_from_official",
    "from_llama",
    "from_official",
    "is_official_folder",
    "load_official_folder",
    "name_pairs",
    "to_official",
]
