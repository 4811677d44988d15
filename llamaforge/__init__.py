"""llamaforge: test, prompt, fine-tune, deploy and benchmark Llama 2 models."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from llamaforge import hugepages  # noqa: F401  (first: asks torch for huge pages before it is imported)

if TYPE_CHECKING:
    from llamaforge.api import LLM, load
    from llamaforge.config import ModelArgs
    from llamaforge.generate import Generation
    from llamaforge.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "Generation", "ModelArgs", "SamplingParams", "__version__", "load"]
# Imported on first use, so `llamaforge --help` and the light commands need not import torch (2-4 s).
_LAZY = {"LLM": "llamaforge.api", "load": "llamaforge.api", "ModelArgs": "llamaforge.config",
         "Generation": "llamaforge.generate", "SamplingParams": "llamaforge.sampling"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llamaforge' has no attribute {name!r}")
