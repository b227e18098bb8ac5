"""minigpt: the Llama-style language model that MiniGPT Book builds, chapter by chapter.

``runtime`` is imported first: on a machine without CUDA it sets ``TRITON_INTERPRET=1`` before
any Triton kernel is defined, so the kernels run on CPU tensors.
"""

from minigpt import runtime  # must come first, see above
from minigpt.config import ModelConfig
from minigpt.model import MiniGPT

__all__ = ["MiniGPT", "ModelConfig", "runtime"]
__version__ = "0.1.0"  # the one place: pyproject.toml reads it, CHANGELOG.md names it
