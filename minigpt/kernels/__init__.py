"""Triton kernels for the model's hot paths, each a drop-in for a plain PyTorch function.

One file per op, layered Liger-Kernel style: Triton kernel -> launcher -> torch.autograd.Function
-> the plain function exported here. On a machine without CUDA, `import minigpt` sets
TRITON_INTERPRET=1 first, so the same kernels run (slowly) on CPU tensors.
"""

from .cross_entropy import cross_entropy
from .flash_attention import flash_attention
from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .rms_norm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu

__all__ = ["apply_rope", "cross_entropy", "flash_attention", "fused_linear_cross_entropy", "rms_norm", "swiglu"]
