"""Test-Time Training layers for language models.

`import ttt_helpers` is enough for `AutoConfig` and `AutoModelForCausalLM` to load a saved TTT
model (`model_type: "ttt"`). The package itself stays light to import: `ttt_helpers.model`,
which registers the model with them, is imported as soon as transformers' Auto classes are
(or at once, where they already are).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_AUTO = "transformers.models.auto.configuration_auto"  # defines AutoConfig; the Auto models build on it
_MODEL = __name__ + ".model"  # registers TTTConfig and TTTForCausalLM (at its end)


class _RegisterWithAuto(importlib.abc.MetaPathFinder):
    """Imports `ttt_helpers.model` when the outermost import of a transformers module that
    brought in the Auto classes has finished (the model's own imports need it finished)."""

    depth = 0  # transformers modules being executed right now, one inside the other

    def find_spec(self, name, path, target=None):
        if name != "transformers" and not name.startswith("transformers."):
            return None
        sys.meta_path.remove(self)  # not for the search just below
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader.exec_module = self._wrap(spec.loader.exec_module)
        return spec

    def _wrap(self, run):
        def exec_module(module):
            self.depth += 1
            try:
                run(module)
            finally:
                self.depth -= 1
            if self.depth == 0 and _AUTO in sys.modules and self in sys.meta_path:
                sys.meta_path.remove(self)
                importlib.import_module(_MODEL)

        return exec_module


if _AUTO in sys.modules:
    importlib.import_module(_MODEL)
elif not any(type(finder).__name__ == "_RegisterWithAuto" for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithAuto())
