"""Training data: find a corpus, split it, tokenise it once into a memmap, draw random windows.

The pipeline, nanoGPT style:

1. ``find_data_file`` locates a known corpus (``shakespeare``, ``tinystories``, ``gutenberg``) in
   ``$MINIGPT_DATA_DIR``, then the ``shared/data`` folder beside the checkout, then the user cache
   (``~/.cache/minigpt``); online, a missing corpus is downloaded from its public source
   (resumable, cached in ``~/.cache/minigpt/downloads``), rebuilt by a fixed rule where the public
   file is not the corpus itself, and checked against its pinned sha256 (see ``KNOWN_CORPORA``).
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
import http.client
import json
import lzma
import math
import os
import random
import re
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .tokenizer import Tokenizer

__all__ = [
    "KNOWN_CORPORA",
    "BatchSampler",
    "Corpus",
    "DataIntegrityError",
    "DataNotFoundError",
    "DownloadError",
    "TokenData",
    "bits_per_byte",
    "data_search_dirs",
    "default_cache_dir",
    "download",
    "eval_batches",
    "find_data_file",
    "load_corpus",
    "parse_gutenberg",
    "split_documents",
    "tokenize_split",
]


class DataNotFoundError(FileNotFoundError):
    """A corpus file is neither on disk nor downloadable; the message says where we looked."""


class DataIntegrityError(ValueError):
    """A downloaded or rebuilt file does not match its pinned sha256."""


class DownloadError(OSError):
    """A download stopped early or the server refused it; the partial file is kept for resuming."""


@dataclass(frozen=True)
class KnownCorpus:
    """A corpus the library can name: where it lives under a data dir and how to get it publicly.

    ``sources`` are public URLs fetched into the download cache; ``build`` turns them into the
    file at ``relpath`` (``None``: the single source *is* that file). ``sha256`` pins the final
    file (``None``: not pinned, because no one has built it from the public source yet; the
    build then prints its hash). ``how`` says how to provide the file by hand.
    """

    relpath: str
    sha256: str | None
    sources: Callable[[], list[str]]
    build: Callable[[Iterator[Path], Path], None] | None
    how: str


_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
_TINYSTORIES_BYTES = 794_375  # the stories of our tinystories_val_794k.txt, each followed by a blank line
_TINYSTORIES_SEP = "<|endoftext|>"
_GUTENBERG_IDS = range(1, 3001)  # candidates, in order; the first English books up to the byte budget are kept
_GUTENBERG_TEXT_BYTES = 100_000_000
_GUTENBERG_URL = "https://www.gutenberg.org/cache/epub/{id}/pg{id}.txt"


def _tinystories_urls() -> list[str]:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return [f"{endpoint}/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt"]


def _build_tinystories(raw: Iterator[Path], dest: Path) -> None:
    """Whole stories of TinyStories-valid.txt in order, each stripped and followed by a blank line,
    as many as fit in 794,375 bytes (``<|endoftext|>`` separates stories in the Hub file)."""
    text = next(raw).read_text(encoding="utf-8").replace("\r\n", "\n")
    out, size = [], 0
    for story in filter(None, (s.strip() for s in text.split(_TINYSTORIES_SEP))):
        n = len(story.encode()) + 2
        if size + n > _TINYSTORIES_BYTES:
            break
        out.append(story + "\n\n")
        size += n
    dest.write_text("".join(out), encoding="utf-8")


def _gutenberg_urls() -> list[str]:
    template = os.environ.get("MINIGPT_GUTENBERG_URL", _GUTENBERG_URL)
    return [template.format(id=i) for i in _GUTENBERG_IDS]


_PG_START = re.compile(r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.I | re.M)
_PG_END = re.compile(r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.I | re.M)
_PG_CREDITS = re.compile(r"\A(?:(?:Produced|Prepared|Transcribed) by|This e-?(?:book|text) was produced by)[^\n]*(?:\n(?!\n)[^\n]*)*\n\n+", re.I)


def _pg_field(header: str, name: str) -> str:
    m = re.search(rf"^{name}: *(.*(?:\n[ \t]+.*)*)", header, re.M)
    return " ".join(m.group(1).split()) if m else ""


def parse_gutenberg(raw: str) -> dict | None:
    """``{"author", "title", "text"}`` of one Project Gutenberg plain-text ebook, or ``None`` when it
    is not English or lacks the START/END markers. ``text`` is what lies between the markers, with
    a leading producer-credit paragraph removed and surrounding whitespace stripped."""
    raw = raw.replace("\r\n", "\n").lstrip("\ufeff")
    start, end = _PG_START.search(raw), _PG_END.search(raw)
    if not start or not end or end.start() < start.end():
        return None
    header = raw[: start.start()]
    if _pg_field(header, "Language").lower() != "english":
        return None
    text = _PG_CREDITS.sub("", raw[start.end() : end.start()].strip()).strip()
    if not text:
        return None
    return {"author": _pg_field(header, "Author"), "title": _pg_field(header, "Title"), "text": text}


def _build_gutenberg(raw: Iterator[Path], dest: Path) -> None:
    """English books in ebook-id order, one JSON object per line, until 100 MB of text (xz)."""
    size = 0
    with lzma.open(dest, "wt", encoding="utf-8", preset=6) as f:
        for path in raw:
            book = parse_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
            if book is None:
                continue
            f.write(json.dumps(book, ensure_ascii=False) + "\n")
            size += len(book["text"].encode())
            if size >= _GUTENBERG_TEXT_BYTES:
                break


KNOWN_CORPORA: dict[str, KnownCorpus] = {
    "shakespeare": KnownCorpus(
        "tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        lambda: [os.environ.get("MINIGPT_SHAKESPEARE_URL", _SHAKESPEARE_URL)],
        None,
        f"download it from {_SHAKESPEARE_URL}",
    ),
    "tinystories": KnownCorpus(
        "tinystories/tinystories_val_794k.txt",
        "5fc1fb0113df62b567fb271806cd645ce8d75f59c58ca0b764c03d3b6ff34ca6",
        _tinystories_urls,
        _build_tinystories,
        "take the whole stories of TinyStories-valid.txt (Hub dataset roneneldan/TinyStories) that fit in "
        "794,375 bytes, each followed by a blank line",
    ),
    "gutenberg": KnownCorpus(
        "gutenberg/gutenberg_en_100M.jsonl.xz",
        None,
        _gutenberg_urls,
        _build_gutenberg,
        "copy gutenberg_en_100M.jsonl.xz from a machine that has it (282 Project Gutenberg books, JSONL.xz)",
    ),
}
_ALIASES = {"tinyshakespeare": "shakespeare", "shakespeare_char": "shakespeare"}


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


def download(url: str, dest: Path, progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` unless it is already there; resumable, atomic, with a progress bar.

    Bytes arrive in ``dest.part``; a rerun after an interrupted transfer asks for the rest with an
    HTTP ``Range`` header (a server that ignores it sends the whole file again, which we take).
    Only a complete transfer is renamed to ``dest``. Raises ``DownloadError`` (an ``OSError``) on a
    short transfer and ``urllib.error.HTTPError`` on an HTTP error status.
    """
    from tqdm.auto import tqdm

    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "minigpt", **({"Range": f"bytes={have}-"} if have else {})})
    try:
        r = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part is already whole
            os.replace(part, dest)
            return dest
        raise
    with r:
        if r.status != 206:
            have = 0  # no resume: the body is the whole file
        length = r.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        got = have
        with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                          desc=f"downloading {dest.name}", disable=not progress) as bar:
            try:
                while block := r.read(1 << 20):
                    f.write(block)
                    got += len(block)
                    bar.update(len(block))
            except (http.client.HTTPException, OSError) as e:  # connection dropped mid-body
                raise DownloadError(f"download of {url} stopped at {got:,} bytes ({e!r}); run again to resume") from None
    if total is not None and got < total:
        raise DownloadError(f"download of {url} stopped at {got:,} of {total:,} bytes; run again to resume")
    os.replace(part, dest)
    return dest


def _downloads(name: str, urls: list[str], progress: bool, skip_missing: bool) -> Iterator[Path]:
    """Download ``urls`` in order into ``~/.cache/minigpt/downloads/<name>/``, lazily, so a build
    that has enough stops fetching. With ``skip_missing`` a 404 is skipped (and remembered)."""
    raw_dir = _user_cache_root() / "downloads" / name
    for url in urls:
        dest = raw_dir / url.rstrip("/").rsplit("/", 1)[-1]
        missing = dest.with_name(dest.name + ".404")
        if skip_missing and missing.is_file():
            continue
        try:
            yield download(url, dest, progress=progress)
        except urllib.error.HTTPError as e:
            if not skip_missing or e.code != 404:
                raise
            missing.touch()


def _fetch_corpus(name: str, spec: KnownCorpus, dest: Path, progress: bool = True) -> None:
    """Download the sources of ``spec`` into the cache, build ``dest`` from them, check its sha256."""
    raw = _downloads(name, spec.sources(), progress, skip_missing=spec.build is not None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".build")
    if spec.build is None:
        shutil.copyfile(next(raw), tmp)
    else:
        spec.build(raw, tmp)
    got = _sha256_file(tmp)
    if spec.sha256 is not None and got != spec.sha256:
        tmp.unlink()
        raise DataIntegrityError(
            f"{name} built from {spec.sources()[0]} has sha256 {got}, expected {spec.sha256}: the upstream file "
            f"changed. Place the expected file at <data dir>/{spec.relpath} by hand ({spec.how})."
        )
    if spec.sha256 is None:
        print(f"built {dest} (sha256 {got}; not pinned in minigpt.data.KNOWN_CORPORA)", file=sys.stderr)
    os.replace(tmp, dest)


def find_data_file(name: str, progress: bool = True) -> Path:
    """The local path of known corpus ``name``, downloading and building it from its public source
    into ``~/.cache/minigpt`` when it is on none of ``data_search_dirs()``.

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
    reason = "offline: MINIGPT_OFFLINE=1 or HF_HUB_OFFLINE=1"
    if not _offline():
        try:
            _fetch_corpus(key, spec, dest, progress)
            return dest
        except OSError as e:  # no network, DNS failure, HTTP error, short transfer
            reason = f"download from {spec.sources()[0]} failed: {e}"
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
            for (text, doc_end), ids in zip(batch, tokenizer.encode_batch([t for t, _ in batch]), strict=True):
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
    meta = {"key": key, "n_tokens": n_tokens, "n_bytes": n_bytes, "dtype": np.dtype(dtype).name,
            "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size}
    meta_tmp.write_text(json.dumps(meta))
    os.replace(meta_tmp, meta_path)
    return TokenData(np.memmap(bin_path, dtype=dtype, mode="r"), n_bytes, bin_path)


def _windows(tokens: np.ndarray, offsets: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(tokens[o : o + block_size + 1], dtype=np.int64) for o in offsets.tolist()])
    xy = torch.from_numpy(rows)
    return xy[:, :-1], xy[:, 1:]


def check_length(tokens: np.ndarray, block_size: int, what: str) -> None:
    """Raise a one-line ValueError if a split of ``tokens`` cannot fill one window of ``block_size`` + 1."""
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
        check_length(data.tokens, block_size, "train")
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


def eval_batches(data: TokenData, block_size: int, batch_size: int, n_batches: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same ``n_batches`` global batches on every call (fixed seed), so eval curves are comparable.

    Like ``BatchSampler``, each global batch of ``world_size * batch_size`` windows is drawn once
    and rank ``r`` gets rows ``[r * batch_size, (r + 1) * batch_size)``: the windows do not depend
    on how many ranks share them.
    """
    check_length(data.tokens, block_size, "val")
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
    return splits[0], splits[1]
