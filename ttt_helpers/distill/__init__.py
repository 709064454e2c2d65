"""Distilling SmolLM2 into the TTT model converted from it: data (`bank`), the two stages (`loop`), the CLI.

`python -m ttt_helpers.distill prepare` writes the data folder on a machine with the corpora,
`python -m ttt_helpers.distill run` trains (one GPU; resumable across commands), and
`python -m ttt_helpers.distill export` writes the delta that `ttt_helpers.pretrained` loads.
"""

from .bank import Bank, load_bank, prepare_bank
from .loop import LORA_TARGETS, TTT_PARAMETERS, DistillConfig, Distiller, make_student, trainable

__all__ = [
    "LORA_TARGETS",
    "TTT_PARAMETERS",
    "Bank",
    "DistillConfig",
    "Distiller",
    "load_bank",
    "make_student",
    "prepare_bank",
    "trainable",
]
