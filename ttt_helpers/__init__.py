"""Test-Time Training layers for language models.

Importing the package registers the TTT model with transformers' `AutoConfig` and
`AutoModelForCausalLM` (`model_type: "ttt"`), so `import ttt_helpers` is all a reader needs
before `AutoModelForCausalLM.from_pretrained(folder)` of a saved TTT model.
"""

from . import model as _model  # noqa: F401  (registers the model at import)
