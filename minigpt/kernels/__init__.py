"""Triton kernels for the model's hot paths, each a drop-in for a plain PyTorch function.

One module per op, layered Liger-Kernel style: Triton kernel -> launcher -> torch.autograd.Function
-> the plain function, e.g. `minigpt.kernels.rms_norm.rms_norm`. The package exports the modules
(not the functions under the modules' names), so `minigpt.kernels.rms_norm` is always the module.
The model does not call these directly: `minigpt.ops` registers them as PyTorch custom ops and
chooses them (or plain PyTorch) once, from `ModelConfig.kernels`. On a machine without CUDA,
`import minigpt` sets TRITON_INTERPRET=1 first, so the same kernels run (slowly) on CPU tensors.
One module is not imported here: `gluon_attention`, attention's Hopper kernels in Gluon, which need
Triton 3.6 or later and an sm_90 GPU to run; `minigpt.ops.hopper_attention` imports it where it applies.
"""

from . import cross_entropy, flash_attention, fused_linear_cross_entropy, rms_norm, rope, swiglu

__all__ = ["cross_entropy", "flash_attention", "fused_linear_cross_entropy", "rms_norm", "rope", "swiglu"]
