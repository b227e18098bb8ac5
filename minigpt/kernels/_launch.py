"""Checks, launch heuristics and constants shared by the Triton kernels and their launchers.

Every launcher validates its inputs here before touching a kernel, so bad input fails with a
``ValueError`` that says what to do instead of a cryptic Triton or CUDA error.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) == exp2(x * LOG2E), exp2 being the hardware's instruction
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log(x) == log2(x) * LN2

# Read once, at import: `triton.jit` decides between compiled and interpreted kernels when the
# kernel modules are imported, so a later change of the variable would not take effect anyway.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_problem(triton_version: str = triton.__version__, numpy_version: str = numpy.__version__) -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels with these versions, or None if it can.

    Triton before 3.7 turns one-element NumPy arrays into Python ints, which NumPy 2.4 made an error
    (triton-lang/triton#9171): every kernel loop with a bound computed at run time then fails inside
    the interpreter with "only 0-dimensional arrays can be converted to Python scalars".
    """
    def major_minor(version: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", version)[:2])

    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter cannot run kernels with NumPy {numpy_version} "
                "(triton-lang/triton#9171); install 'numpy<2.4' or 'triton>=3.7'")
    return None


def check_tensors(op: str, **tensors: torch.Tensor) -> None:
    """Raise ValueError unless all tensors are floating point and on one usable device.

    Usable means CUDA, or CPU while Triton's interpreter is active (``TRITON_INTERPRET=1`` set
    before ``minigpt`` is imported).
    """
    devices = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device.type == "cpu" and not INTERPRET:
            raise ValueError(
                f"{op}: {name} is on the CPU but Triton kernels need a CUDA tensor; move it with "
                "`.cuda()` or set TRITON_INTERPRET=1 before importing minigpt to run the kernel "
                "in Triton's (slow) interpreter"
            )
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{op}: {name} is on {t.device}; only CUDA (or CPU in the interpreter) works")
        devices.add(t.device)
    if len(devices) > 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(map(str, devices))}")


def launcher(kernel: Any, probe: torch.Tensor) -> Any:
    """The Triton kernel `kernel`, ready to index with a grid: ``launcher(k, x)[grid](...)``.

    Called on real tensors it is the kernel itself (a direct launch, no dispatch cost). While
    ``torch.compile`` traces one of `minigpt.ops`'s ``torch.library.triton_op``s, the tensors are
    fake (`probe` is one of them) and the kernel is wrapped with ``torch.library.wrap_triton``:
    the launch is recorded in the graph, and Inductor calls the kernel from its generated code
    like one of its own, instead of going through a Python custom-op call per launch (issue 12
    measured that host cost at 2.5x a compiled training step of `small` on the H200).
    In the interpreter, raises RuntimeError naming the fix when `interpreter_problem` finds one.
    """
    if INTERPRET and (problem := interpreter_problem()):  # else a traceback from inside the interpreter
        raise RuntimeError(f"{kernel.__name__}: {problem}")
    if not INTERPRET and is_fake(probe):
        return torch.library.wrap_triton(kernel)
    return kernel


def as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """View `t` [..., n_cols] as a 2D [rows, n_cols] tensor with unit column stride.

    Rows may be strided (e.g. a slice of a wider activation); only a tensor whose last dimension is
    itself strided is copied, because the kernels load a row with one contiguous vector load.
    """
    rows = t.reshape(-1, n_cols)
    return rows if rows.stride(-1) == 1 or n_cols == 1 else rows.contiguous()


def acc_dtype(t: torch.Tensor) -> tl.dtype:
    """Accumulation dtype for a kernel: fp64 for fp64 inputs (gradcheck), else fp32."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def num_warps_for(block: int) -> int:
    """Warps per program for a row of `block` elements: enough threads to keep loads wide."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability (major, minor) of a CUDA ``device``; None on the CPU or in the interpreter,
    where the launchers' tiles are the interpreter's and no hardware limit applies."""
    if INTERPRET or device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on `device` (a small constant in the CPU interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
