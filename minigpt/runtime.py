"""Where the code runs: one place that picks device, dtype and problem sizes.

Every notebook, script and test asks this module instead of deciding for itself, so a chapter
runs unchanged on a laptop CPU, a Colab T4 and an H100:

- CUDA: bf16 where the card supports it (sm_80+), else fp16 (T4 / sm_75).
- CPU: fp32, "smoke" mode (small sizes), and Triton kernels through the interpreter.

Importing this module on a machine without CUDA sets ``TRITON_INTERPRET=1`` (unless the user
already chose a value). That must happen before any ``@triton.jit`` function is defined, which
is why ``minigpt/__init__.py`` imports this module first.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
from pathlib import Path

import torch

__all__ = [
    "autocast",
    "describe",
    "device",
    "dtype",
    "gpu_name",
    "grad_scaler",
    "has_native_bf16",
    "is_smoke",
    "measured_on",
    "peak_flops",
    "pick_device",
    "provenance",
    "results_dir",
    "smoke_or",
    "triton_interpreted",
]

if not torch.cuda.is_available():
    if "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ:
        warnings.warn(
            "triton was imported before minigpt on a machine without CUDA: Triton helpers built before "
            "TRITON_INTERPRET=1 was set will fail inside kernels. Import minigpt first.",
            RuntimeWarning,
            stacklevel=2,
        )
    os.environ.setdefault("TRITON_INTERPRET", "1")


def device() -> torch.device:
    """The device to compute on: the current CUDA device if there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_device(choice: str | None, local_rank: int = 0) -> torch.device:
    """The device a ``--device`` flag names: ``auto``/None (CUDA if visible, else CPU), ``cpu``, ``cuda`` (GPU
    ``local_rank``) or ``cuda:N``. Asking for CUDA where PyTorch sees none is an error naming the fix."""
    if choice in (None, "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {choice}: no CUDA GPU is visible to PyTorch here; use --device cpu (or auto)")
        index = local_rank if choice == "cuda" else choice[len("cuda:"):]
        n = torch.cuda.device_count()
        if not str(index).isdigit() or int(index) >= n:
            raise ValueError(f"--device {choice}: this machine has {n} CUDA device(s): use cuda or cuda:0 .. cuda:{n - 1}")
        return torch.device("cuda", int(index))
    raise ValueError(f"--device {choice}: use auto, cpu, cuda or cuda:N")


def has_native_bf16() -> bool:
    """True on a CUDA GPU of compute capability 8.0+ (A100, H100, ...), whose tensor cores do bf16.

    Not ``torch.cuda.is_bf16_supported()``: by default that also counts emulated bf16, so it says True
    on a T4 (sm_75), where bf16 matmuls are slow and Triton's ``tl.dot`` rejects bf16.
    """
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def dtype() -> torch.dtype:
    """The training/inference dtype: bf16 on sm_80+, fp16 on older GPUs (a Colab T4), fp32 on CPU."""
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if has_native_bf16() else torch.float16


def autocast(dev: torch.device) -> torch.autocast:
    """Mixed precision as the chapters' hand-written training loops use it: ``dtype()`` under
    ``torch.autocast`` on a GPU, plain fp32 on the CPU."""
    return torch.autocast(dev.type, dtype=dtype(), enabled=dev.type == "cuda")


def grad_scaler(dev: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (a T4, whose small gradients underflow in fp16); a pass-through for bf16 and fp32."""
    return torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda" and dtype() == torch.float16)


def results_dir() -> Path:
    """The book's ``results/`` folder, which ships with the repository, not with the package.

    The first that exists of: ``$MINIGPT_RESULTS_DIR``; the checkout the library was imported from
    (an editable install, ``make``'s venv); ``../results`` (a chapter run from ``notebooks/``, as the
    Colab set-up cell leaves it, with ``minigpt`` installed from the clone into site-packages);
    ``./results``. If none exists, the checkout's path, for the chapters' "not found" message.
    """
    env = os.environ.get("MINIGPT_RESULTS_DIR")
    candidates = ([Path(env)] if env else []) + [Path(__file__).resolve().parents[1] / "results",
                                                  Path.cwd().parent / "results", Path.cwd() / "results"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def is_smoke() -> bool:
    """True on CPU or when ``MINIGPT_SMOKE=1``: notebooks and scripts then use small sizes."""
    return os.environ.get("MINIGPT_SMOKE", "0") == "1" or not torch.cuda.is_available()


def smoke_or(smoke_value, full_value):
    """Pick ``smoke_value`` in smoke mode and ``full_value`` on a GPU (sizes, step counts)."""
    return smoke_value if is_smoke() else full_value


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gpu_name() -> str:
    """The CUDA device name (e.g. 'NVIDIA H100 80GB HBM3'), or 'cpu'."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


# Dense bf16 tensor-core peaks (fp16 for cards without bf16), FLOP/s, by a substring of the name
# (first match wins, so "H100 PCIe" precedes "H100"). MFU divides achieved FLOP/s by these.
_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


def peak_flops(name: str | None = None) -> float | None:
    """The card's dense bf16 (fp16 on T4/V100) peak in FLOP/s; None when unknown or on CPU.

    ``name`` defaults to this machine's :func:`gpu_name`.
    """
    name = gpu_name() if name is None else name
    for key, flops in _PEAK_FLOPS:
        if key in name:
            return flops
    return None


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def provenance() -> dict:
    """Machine-readable facts every measured number carries: card, dtype, versions."""
    return {
        "gpu": gpu_name(),
        "dtype": str(dtype()).replace("torch.", ""),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "smoke": is_smoke(),
    }


def measured_on(p: dict) -> str:
    """A results file's provenance as the chapters print it: card, dtype, versions, date."""
    return f"measured on {p['gpu']}, {p['dtype']}, torch {p['torch']}, triton {p['triton']}, {p['date'][:10]}"


def describe() -> str:
    """One line naming the card, dtype and versions; printed at the top of every chapter."""
    p = provenance()
    mode = " (smoke sizes)" if p["smoke"] else ""
    return f"{p['gpu']}, {p['dtype']}, torch {p['torch']}, triton {p['triton']}{mode}"
