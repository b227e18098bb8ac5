"""Training data: find a corpus, split it, tokenise it once into a memmap, draw random windows.

The pipeline, nanoGPT style:

1. ``find_data_file`` locates a known corpus (``shakespeare``, ``tinystories``, ``gutenberg``) in
   ``$MINIGPT_DATA_DIR``, then the ``shared/data`` folder beside the checkout, then the user cache
   (``~/.cache/minigpt``); online, a missing public corpus is downloaded and its sha256 checked.
2. ``load_corpus`` reads documents and splits them: Tiny Shakespeare 90/10 by characters (as
   nanoGPT's ``shakespeare_char``, so val losses compare), multi-document corpora by document
   (whole stories / whole books held out), chosen by a seeded draw.
3. ``tokenize_split`` encodes a split once into a flat uint16/uint32 file (documents separated by
   the tokenizer's EOS id) cached under a key that hashes corpus + split + tokenizer, then memory
   maps it: re-tokenising happens only when one of them changes.
4. ``BatchSampler`` draws random ``block_size + 1`` windows with a seeded generator. It draws the
   *global* batch of one optimizer step (all micro-steps, all ranks) and hands each DDP rank its
   own slice, so N ranks see exactly the windows one process would see with the same global batch.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import random
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .tokenizer import Tokenizer

__all__ = [
    "DataNotFoundError",
    "DataIntegrityError",
    "KNOWN_CORPORA",
    "data_search_dirs",
    "find_data_file",
    "Corpus",
    "load_corpus",
    "split_documents",
    "TokenData",
    "tokenize_split",
    "default_cache_dir",
    "BatchSampler",
    "eval_batches",
    "bits_per_byte",
]


class DataNotFoundError(FileNotFoundError):
    """A corpus file is neither on disk nor downloadable; the message says where we looked."""


class DataIntegrityError(ValueError):
    """A downloaded file does not match its published sha256."""


@dataclass(frozen=True)
class KnownCorpus:
    relpath: str
    sha256: str
    url: str | None  # public original, None when it cannot be downloaded
    how: str  # how a user provides it by hand


KNOWN_CORPORA: dict[str, KnownCorpus] = {
    "shakespeare": KnownCorpus(
        "tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "download it from the char-rnn repository (data/tinyshakespeare/input.txt)",
    ),
    "tinystories": KnownCorpus(
        "tinystories/tinystories_val_794k.txt",
        "5fc1fb0113df62b567fb271806cd645ce8d75f59c58ca0b764c03d3b6ff34ca6",
        "hf://datasets/roneneldan/TinyStories/TinyStories-valid.txt",
        "take the first 794,375 bytes of stories of TinyStories-valid.txt (Hub dataset "
        "roneneldan/TinyStories), one blank line between stories",
    ),
    "gutenberg": KnownCorpus(
        "gutenberg/gutenberg_en_100M.jsonl.xz",
        "4614cbd1512a9b766cc18acd32e3bc67d90a9fb45f916d979b83dc4b3e616dec",
        None,
        "copy it from the project's shared/data folder (282 Project Gutenberg books, JSONL.xz)",
    ),
}
_ALIASES = {"tinyshakespeare": "shakespeare", "shakespeare_char": "shakespeare"}
_TINYSTORIES_BYTES = 794_375
_TINYSTORIES_SEP = "<|endoftext|>"


def _shared_data_dir() -> Path:
    """``shared/data`` beside the checkout (the repo's parent), resolved from the package location."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def _user_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minigpt"


def data_search_dirs() -> list[Path]:
    """Where corpora are looked for, in order: $MINIGPT_DATA_DIR, ../shared/data, ~/.cache/minigpt."""
    dirs = []
    if os.environ.get("MINIGPT_DATA_DIR"):
        dirs.append(Path(os.environ["MINIGPT_DATA_DIR"]).expanduser())
    dirs += [_shared_data_dir(), _user_cache_root()]
    return dirs


def default_cache_dir() -> Path:
    """Where tokenised corpora are cached: $MINIGPT_CACHE_DIR or ~/.cache/minigpt/tokens."""
    if os.environ.get("MINIGPT_CACHE_DIR"):
        return Path(os.environ["MINIGPT_CACHE_DIR"]).expanduser()
    return _user_cache_root() / "tokens"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _offline() -> bool:
    return os.environ.get("MINIGPT_OFFLINE", "0") == "1" or os.environ.get("HF_HUB_OFFLINE", "0") == "1"


def _download(name: str, spec: KnownCorpus, dest: Path) -> None:
    """Fetch the public original into ``dest`` (atomically) and check its sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    if spec.url.startswith("hf://"):
        from huggingface_hub import hf_hub_download

        raw = hf_hub_download("roneneldan/TinyStories", "TinyStories-valid.txt", repo_type="dataset")
        stories = [s.strip() for s in Path(raw).read_text(encoding="utf-8").split(_TINYSTORIES_SEP)]
        out, size = [], 0
        for s in filter(None, stories):
            size += len(s.encode()) + 2
            if size > _TINYSTORIES_BYTES:
                break
            out.append(s)
        tmp.write_text("\n\n".join(out) + "\n", encoding="utf-8")
    else:
        with urllib.request.urlopen(spec.url, timeout=60) as r, open(tmp, "wb") as f:
            f.write(r.read())
    got = _sha256_file(tmp)
    if got != spec.sha256:
        tmp.unlink()
        raise DataIntegrityError(
            f"downloaded {name} has sha256 {got}, expected {spec.sha256}: the upstream file changed. "
            f"Place the expected file at <data dir>/{spec.relpath} by hand ({spec.how})."
        )
    os.replace(tmp, dest)


def find_data_file(name: str) -> Path:
    """The local path of known corpus ``name``, downloading the public original when possible.

    Raises ``DataNotFoundError`` listing every place searched and how to provide the file.
    """
    key = _ALIASES.get(name, name)
    if key not in KNOWN_CORPORA:
        raise ValueError(f"unknown corpus {name!r}: use one of {sorted(KNOWN_CORPORA)} or a path to a .txt/.jsonl/.jsonl.xz file")
    spec = KNOWN_CORPORA[key]
    dirs = data_search_dirs()
    for d in dirs:
        if (d / spec.relpath).is_file():
            return d / spec.relpath
    dest = _user_cache_root() / spec.relpath
    reason = "no download URL" if spec.url is None else "offline (MINIGPT_OFFLINE=1 or HF_HUB_OFFLINE=1)"
    if spec.url is not None and not _offline():
        try:
            _download(key, spec, dest)
            return dest
        except (OSError, ImportError) as e:  # no network, DNS failure, HTTP error, hub unreachable
            reason = f"download from {spec.url} failed: {e}"
    looked = "\n".join(f"  {d / spec.relpath}" for d in dirs)
    raise DataNotFoundError(
        f"corpus {name!r} not found. Looked in:\n{looked}\n({reason}). To provide it, {spec.how}, "
        f"and put it at $MINIGPT_DATA_DIR/{spec.relpath} (or any folder above, same relative path)."
    )


@dataclass
class Corpus:
    """A corpus split into train/val documents; ``fingerprint`` identifies content + split.

    ``mode`` is "by-character" (one text cut in two) or "by-document" (whole documents held out).
    """

    name: str
    train: list[str]
    val: list[str]
    fingerprint: str
    mode: str

    def split(self, which: str) -> list[str]:
        if which not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {which!r}")
        return self.train if which == "train" else self.val


def split_documents(docs: list[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Hold out whole documents: a seeded draw of ``round(val_fraction * len(docs))`` (at least 1).

    Both halves keep corpus order. The draw depends only on ``seed`` and ``len(docs)``.
    """
    if len(docs) < 2:
        raise ValueError(f"splitting by document needs at least 2 documents, got {len(docs)}")
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    val_idx = set(random.Random(seed).sample(range(len(docs)), n_val))
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def _read_jsonl(path: Path) -> list[str]:
    opener = lzma.open if path.suffix == ".xz" else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg}); each line must be an object with a 'text' field") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{lineno} has no string 'text' field; each line must look like {{\"text\": \"...\"}}")
            if obj["text"]:
                docs.append(obj["text"])
    return docs


def load_corpus(data: str, val_fraction: float = 0.1, seed: int = 0) -> Corpus:
    """Read corpus ``data`` (a known name or a path) and split it into train/val documents.

    - ``shakespeare`` and any ``.txt`` file: one document, split by characters (first 1 - f train).
    - ``tinystories``: stories separated by a blank line, split by story.
    - ``gutenberg`` and any ``.jsonl``/``.jsonl.xz``: one document per line's ``text``, split by document.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    key = _ALIASES.get(data, data)
    if key in KNOWN_CORPORA:
        path, name = find_data_file(key), key
    else:
        path, name = Path(data).expanduser(), Path(data).name.split(".")[0]
        if not path.is_file():
            raise DataNotFoundError(
                f"{data!r} is neither a known corpus ({', '.join(sorted(KNOWN_CORPORA))}) nor an existing file"
            )
    suffixes = "".join(path.suffixes[-2:])
    if key == "tinystories":
        text = path.read_text(encoding="utf-8")
        docs = [s.strip() for s in text.split("\n\n") if s.strip()]
        train, val = split_documents(docs, val_fraction, seed)
        mode = "by-document"
    elif path.suffix == ".jsonl" or suffixes == ".jsonl.xz":
        docs = _read_jsonl(path)
        train, val = split_documents(docs, val_fraction, seed)
        mode = "by-document"
    elif path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        if len(text) < 2:
            raise ValueError(f"{path} holds {len(text)} characters: too little text to split into train and val")
        n = int(len(text) * (1 - val_fraction))
        train, val = [text[:n]], [text[n:]]
        mode = "by-character"
    else:
        raise ValueError(f"unsupported data file {path}: use a .txt (one document) or .jsonl/.jsonl.xz (one {{'text': ...}} per line)")
    h = hashlib.sha256(f"{_sha256_file(path)}|{mode}|{val_fraction}|{seed}".encode()).hexdigest()
    return Corpus(name=name, train=train, val=val, fingerprint=h, mode=mode)


@dataclass
class TokenData:
    """One tokenised split: a read-only memmap of ids plus the UTF-8 byte count of its text."""

    tokens: np.ndarray
    n_bytes: int
    path: Path

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


def _chunks(text: str, size: int) -> Iterator[str]:
    """Cut a long document after newlines followed by non-space, where BPE pre-tokens split anyway."""
    start = 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and cut + 1 < len(text) and text[cut + 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        yield text[start : cut + 1]
        start = cut + 1
    yield text[start:]


def tokenize_split(corpus: Corpus, split: str, tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> TokenData:
    """Token ids of one split (an EOS after every document when the tokenizer has one), memory mapped.

    The ids are cached in ``cache_dir`` as ``<name>-<split>-<key>.bin`` (+ ``.json`` metadata);
    the key hashes the corpus fingerprint, the split and the tokenizer, so a changed corpus or
    tokenizer gets a fresh file and an unchanged pair is read back without re-tokenising.
    """
    from tqdm.auto import tqdm

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = hashlib.sha256(f"v1|{corpus.fingerprint}|{split}|{tokenizer.fingerprint()}".encode()).hexdigest()[:20]
    bin_path = cache / f"{corpus.name}-{split}-{key}.bin"
    meta_path = bin_path.with_suffix(".json")
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    if bin_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        expected = meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
        if meta.get("key") == key and bin_path.stat().st_size == expected:
            return TokenData(np.memmap(bin_path, dtype=meta["dtype"], mode="r"), meta["n_bytes"], bin_path)
    docs = corpus.split(split)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = bin_path.with_name(bin_path.name + f".{os.getpid()}.part")
    n_tokens = n_bytes = 0
    pieces: list[list[str]] = [list(_chunks(d, 1 << 20)) for d in docs]
    total = sum(len(d.encode()) for d in docs)
    batch_chars = 16 << 20
    with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenising {corpus.name}/{split}", disable=not progress) as bar:
        work: list[tuple[str, bool]] = [(p, i == len(ps) - 1) for ps in pieces for i, p in enumerate(ps)]
        i = 0
        while i < len(work):
            j, size = i, 0
            while j < len(work) and (j == i or size + len(work[j][0]) <= batch_chars):
                size += len(work[j][0])
                j += 1
            batch = work[i:j]
            for (text, doc_end), ids in zip(batch, tokenizer.encode_batch([t for t, _ in batch])):
                if doc_end and tokenizer.eos_id is not None:
                    ids.append(tokenizer.eos_id)
                np.asarray(ids, dtype=dtype).tofile(f)
                n_tokens += len(ids)
                b = len(text.encode())
                n_bytes += b
                bar.update(b)
            i = j
    os.replace(tmp, bin_path)
    meta_tmp = meta_path.with_name(meta_path.name + f".{os.getpid()}.part")
    meta_tmp.write_text(json.dumps({"key": key, "n_tokens": n_tokens, "n_bytes": n_bytes, "dtype": np.dtype(dtype).name, "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size}))
    os.replace(meta_tmp, meta_path)
    return TokenData(np.memmap(bin_path, dtype=dtype, mode="r"), n_bytes, bin_path)


def _windows(tokens: np.ndarray, offsets: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(tokens[o : o + block_size + 1], dtype=np.int64) for o in offsets.tolist()])
    xy = torch.from_numpy(rows)
    return xy[:, :-1], xy[:, 1:]


def _check_length(tokens: np.ndarray, block_size: int, what: str) -> None:
    if tokens.shape[0] < block_size + 2:
        raise ValueError(
            f"the {what} split has {tokens.shape[0]} tokens, too few for block_size={block_size} "
            f"(need at least {block_size + 2}): use a smaller --block-size or more data"
        )


class BatchSampler:
    """Random ``(x, y)`` windows for one rank, nanoGPT style, reproducible across world sizes.

    Each call to ``next_step()`` draws the offsets of one optimizer step for *all* ranks,
    shaped ``[grad_accum, world_size, batch_size]``, from one seeded ``torch.Generator``, and
    returns this rank's ``grad_accum`` micro-batches (``x, y`` each ``[batch_size, block_size]``
    int64). The generator state and step count are the sampler's ``state_dict`` (checkpointed).
    """

    def __init__(self, data: TokenData, block_size: int, batch_size: int, grad_accum: int = 1, rank: int = 0, world_size: int = 1, seed: int = 1337):
        for nm, v in (("block_size", block_size), ("batch_size", batch_size), ("grad_accum", grad_accum), ("world_size", world_size)):
            if v < 1:
                raise ValueError(f"{nm} must be >= 1, got {v}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        _check_length(data.tokens, block_size, "train")
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.grad_accum, self.rank, self.world_size = grad_accum, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        high = self.data.n_tokens - self.block_size - 1
        shape = (self.grad_accum, self.world_size, self.batch_size)
        offsets = torch.randint(0, high + 1, shape, generator=self.generator)
        self.steps += 1
        return [_windows(self.data.tokens, offsets[m, self.rank], self.block_size) for m in range(self.grad_accum)]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.steps = int(state["steps"])


def eval_batches(data: TokenData, block_size: int, batch_size: int, n_batches: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same ``n_batches`` global batches on every call (fixed seed), so eval curves are comparable.

    Like ``BatchSampler``, each global batch of ``world_size * batch_size`` windows is drawn once
    and rank ``r`` gets rows ``[r * batch_size, (r + 1) * batch_size)``: the windows do not depend
    on how many ranks share them.
    """
    _check_length(data.tokens, block_size, "val")
    g = torch.Generator().manual_seed(seed)
    high = data.n_tokens - block_size - 1
    offsets = torch.randint(0, high + 1, (n_batches, world_size, batch_size), generator=g)
    for i in range(n_batches):
        yield _windows(data.tokens, offsets[i, rank], block_size)


def bits_per_byte(loss: float, n_tokens: int, n_bytes: int) -> float:
    """Bits per UTF-8 byte from a mean loss in nats per token: loss * tokens / bytes / ln 2.

    Unlike per-token loss it compares models with different tokenizers on the same text.
    """
    if n_bytes <= 0:
        raise ValueError("bits_per_byte needs a positive byte count")
    return loss * n_tokens / n_bytes / math.log(2)


# ---- A training run's data: its tokenizer and both token caches (what the trainer calls) ----------


def make_tokenizer(spec: str, corpus: Corpus, cache_dir: str | os.PathLike | None = None, bpe_vocab_size: int = 20000, progress: bool = True) -> Tokenizer:
    """The run's tokenizer: ``'char'`` (built from the corpus), ``'bpe'`` (trained on the train split,
    cached by corpus fingerprint and vocabulary size), or a path to a ``tokenizer.json``."""
    from .tokenizer import load_tokenizer, train_bpe, train_char

    if spec == "char":
        return train_char(corpus.train + corpus.val, eos=corpus.mode == "by-document")
    if spec == "bpe":
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        path = cache / f"tokenizer-bpe{bpe_vocab_size}-{corpus.name}-{corpus.fingerprint[:16]}.json"
        if path.is_file():
            return load_tokenizer(path)
        tok = train_bpe(corpus.train, bpe_vocab_size, show_progress=progress)
        tok.save(path)
        return tok
    return load_tokenizer(spec)


def prepare_splits(corpus: Corpus, tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> tuple[TokenData, TokenData]:
    """(train, val) token memmaps. Under torchrun rank 0 tokenises and writes the caches while the
    other ranks wait, then map the same files (tokenising N times would waste N-1 CPUs' work)."""
    from . import distributed

    master = distributed.is_master_process()
    if master:
        splits = tuple(tokenize_split(corpus, s, tokenizer, cache_dir, progress) for s in ("train", "val"))
    distributed.barrier()
    if not master:
        splits = tuple(tokenize_split(corpus, s, tokenizer, cache_dir, False) for s in ("train", "val"))
    return splits
