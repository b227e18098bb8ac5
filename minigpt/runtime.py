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
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CardSpec",
    "autocast",
    "card_spec",
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


def available_memory_bytes() -> int | None:
    """Host memory a new allocation can take now (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        pass
    return None


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


@dataclass(frozen=True)
class CardSpec:
    """One card's data-sheet figures (NVIDIA data sheets and architecture whitepapers): the hardware's
    limits, which the chapters set beside what `minigpt.measure.ceilings` measures. None: not listed here."""

    name: str  # as the data sheet names the card
    bf16_tflops: float  # dense tensor-core peak, bf16 (fp16 on cards without bf16: T4, V100)
    hbm_tbs: float | None = None  # memory bandwidth, TB/s
    sms: int | None = None  # streaming multiprocessors
    smem_kb_per_sm: int | None = None  # shared memory / L1 per SM, KB
    l2_mb: int | None = None  # L2 cache, MB


# The one table of card figures, by a substring of the device name (first match wins, so
# "H100 PCIe"/"H100 NVL" precede "H100", "L40S"/"L40" precede "L4", the 80 GB A100s the 40 GB one). MFU divides achieved FLOP/s by
# ``bf16_tflops``; chapter 6 compares the article's A100 with an H100, chapter 11 a measured ceiling
# with the measuring card's figures.
_CARDS = (
    ("H200", CardSpec("H200", 989, hbm_tbs=4.8, sms=132, smem_kb_per_sm=228, l2_mb=60)),  # L2: as the card reports it
    ("H100 PCIe", CardSpec("H100 PCIe", 756, hbm_tbs=2.0, sms=114, smem_kb_per_sm=228, l2_mb=50)),
    ("H100 NVL", CardSpec("H100 NVL", 835, hbm_tbs=3.9, sms=132, smem_kb_per_sm=228, l2_mb=50)),
    ("H100", CardSpec("H100 SXM", 989, hbm_tbs=3.35, sms=132, smem_kb_per_sm=228, l2_mb=50)),
    ("A100-SXM4-80GB", CardSpec("A100 SXM 80GB", 312, hbm_tbs=2.039, sms=108, smem_kb_per_sm=192, l2_mb=40)),
    ("A100 80GB PCIe", CardSpec("A100 PCIe 80GB", 312, hbm_tbs=1.935, sms=108, smem_kb_per_sm=192, l2_mb=40)),
    ("A100", CardSpec("A100 40GB", 312, hbm_tbs=1.555, sms=108, smem_kb_per_sm=192, l2_mb=40)),
    ("L40S", CardSpec("L40S", 362, hbm_tbs=0.864)),
    ("L40", CardSpec("L40", 181, hbm_tbs=0.864)),
    ("L4", CardSpec("L4", 121, hbm_tbs=0.3)),
    ("A10G", CardSpec("A10G", 70, hbm_tbs=0.6)),
    ("A10", CardSpec("A10", 125, hbm_tbs=0.6)),
    ("V100", CardSpec("V100", 125, hbm_tbs=0.9)),
    ("T4", CardSpec("T4", 65, hbm_tbs=0.32)),
)


def card_spec(name: str | None = None) -> CardSpec | None:
    """The data-sheet figures of the card whose device name contains a key of the table (e.g.
    'NVIDIA H100 80GB HBM3' -> the H100 SXM's); None when unknown or on CPU. A card name as the
    table writes it ('H100 SXM', 'A100 40GB') finds its own row the same way.

    ``name`` defaults to this machine's :func:`gpu_name`.
    """
    name = gpu_name() if name is None else name
    return next((spec for key, spec in _CARDS if key in name), None)


def peak_flops(name: str | None = None) -> float | None:
    """The card's dense bf16 (fp16 on T4/V100) peak in FLOP/s, from :func:`card_spec`; None when
    unknown or on CPU. ``name`` defaults to this machine's :func:`gpu_name`.
    """
    spec = card_spec(name)
    return spec.bf16_tflops * 1e12 if spec else None


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
