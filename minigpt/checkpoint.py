"""Checkpoints: one file holding everything needed to resume a run exactly or to load a model.

A checkpoint (``ckpt.pt``) is a ``torch.save`` dict: model, optimizer, grad-scaler and sampler
state, RNG states of every rank, the step (which with the train config fully determines the
learning-rate schedule), the model and train configs, and the tokenizer JSON (also written as
``tokenizer.json`` next to it). It is written atomically (temp file + ``os.replace``), so a crash
mid-save leaves the previous checkpoint intact, and it carries a sha256 of its tensors and
values, because ``torch.load`` does not notice flipped bytes inside a tensor.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .model import MiniGPT
from .tokenizer import TOKENIZER_FILE, Tokenizer

__all__ = ["CKPT_FILE", "CheckpointError", "checkpoint_path", "load_checkpoint", "load_model", "save_checkpoint"]

CKPT_FILE = "ckpt.pt"
FORMAT = "minigpt-checkpoint-v1"
_REQUIRED = ("format", "digest", "model", "model_config", "train_config", "tokenizer", "step")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, or does not match the requested run."""


def checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file, else ``path/ckpt.pt`` (a run directory)."""
    path = Path(path)
    return path / CKPT_FILE if path.is_dir() or not path.suffix else path


def _digest(obj: Any, h: hashlib._Hash | None = None) -> hashlib._Hash:
    """sha256 over a nested structure: tensor bytes (with dtype and shape) and leaf reprs."""
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        for k, v in obj.items():
            h.update(f"K{k!r}".encode())
            _digest(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _digest(v, h)
    else:
        h.update(f"V{obj!r}".encode())
    return h


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Atomically write ``state`` (plus format tag and digest) and ``tokenizer.json`` beside it."""
    path = checkpoint_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in state.items() if k not in ("format", "digest")}
    payload = {"format": FORMAT, "digest": _digest(body).hexdigest(), **body}
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    tok_tmp = path.with_name(TOKENIZER_FILE + f".{os.getpid()}.tmp")
    tok_tmp.write_text(state["tokenizer"], encoding="utf-8")
    os.replace(tok_tmp, path.parent / TOKENIZER_FILE)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and verify a checkpoint; raises ``CheckpointError`` saying what is wrong and what to do."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: pass a run directory (holding {CKPT_FILE}) or the .pt file itself")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its central directory is at the end
        raise CheckpointError(f"{path} is not a checkpoint file, or it is truncated or corrupt (a .pt file is a zip archive): "
                              f"pass a run directory or its {CKPT_FILE}; re-copy it or resume from an earlier checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling and EOF errors inside the archive: an unreadable file
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {first_line}); "
            "it is truncated or corrupt: re-copy it or resume from an earlier checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a minigpt checkpoint (expected format {FORMAT!r})")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: it was not written by minigpt.checkpoint.save_checkpoint")
    body = {k: v for k, v in ckpt.items() if k not in ("format", "digest")}
    if _digest(body).hexdigest() != ckpt["digest"]:
        raise CheckpointError(f"{path} is corrupt: its contents do not match the stored sha256; re-copy it or resume from an earlier checkpoint")
    return ckpt


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[MiniGPT, Tokenizer, dict]:
    """The trained model (eval mode, on ``device``), its tokenizer, and the raw checkpoint dict."""
    ckpt = load_checkpoint(path)
    try:
        config = ModelConfig.from_dict(ckpt["model_config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {checkpoint_path(path)} has an invalid model config: {e}") from None
    model = MiniGPT(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its own model config: {str(e)[:300]}") from None
    tokenizer = Tokenizer.from_json(ckpt["tokenizer"])
    return model.to(device).eval(), tokenizer, ckpt
