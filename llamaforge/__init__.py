"""llamaforge: test, prompt, fine-tune, deploy and benchmark Llama 2 models."""

from llamaforge.api import LLM, load
from llamaforge.config import ModelArgs
from llamaforge.generate import Generation
from llamaforge.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "Generation", "ModelArgs", "SamplingParams", "__version__", "load"]
