"""Shared test setup: importing minigpt first sets TRITON_INTERPRET=1 on machines without CUDA,
before any Triton kernel module is imported (kernels then run on CPU tensors)."""

import minigpt  # noqa: F401
