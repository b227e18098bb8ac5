"""Helpers for the book's notebooks: show the library's real source, print reproducible verdicts."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

__all__ = ["show_source", "agree"]


def show_source(obj: Any, start: Optional[str] = None, end: Optional[str] = None):
    """Render the source of a minigpt function, class or Triton kernel (highlighted in Jupyter).

    ``start``/``end`` optionally cut the listing to the lines from the first one containing
    ``start`` up to (and including) the first later one containing ``end``, so a chapter can read
    a long kernel part by part.
    """
    if hasattr(obj, "fn") and not (inspect.isfunction(obj) or inspect.isclass(obj)):
        obj = obj.fn  # a @triton.jit kernel wraps the Python function it compiles
    source = inspect.getsource(obj)
    if start is not None or end is not None:
        lines = source.splitlines()
        i = next((n for n, line in enumerate(lines) if start is None or start in line), None)
        if i is None:
            raise ValueError(f"{start!r} does not occur in the source of {obj.__qualname__}")
        j = next((n for n in range(i, len(lines)) if end is not None and end in lines[n]), len(lines) - 1)
        source = "\n".join(lines[i:j + 1]) + "\n"
    try:
        from IPython.display import Code
    except ImportError:
        return source
    return Code(source, language="python")


def agree(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> str:
    """A deterministic one-line verdict that ``got`` matches ``want`` (same on CPU and GPU).

    Prints no floats that vary by machine, so notebooks can tag the cell ``nbval-check-output``.
    """
    if got.shape != want.shape:
        return f"{name}: shape mismatch {tuple(got.shape)} vs {tuple(want.shape)}"
    ok = torch.allclose(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol)
    return f"{name}: {'match' if ok else 'MISMATCH'} (rtol={rtol:g}, atol={atol:g}, shape {tuple(got.shape)})"
