"""Tokenizers: text <-> integer ids, character level or byte-level BPE.

Both kinds are stored in the Hugging Face ``tokenizers`` JSON format (``tokenizer.json``), so one
``load_tokenizer(path)`` reads either back, and an exported model can ship the same file:

- ``char``: one id per character of the training text (nanoGPT's ``shakespeare_char``: 65 ids for
  Tiny Shakespeare). Stored as a ``WordLevel`` model whose pre-tokenizer isolates each character.
- ``bpe``: byte-level BPE (GPT-2 style) trained with ``tokenizers``; any string encodes, no
  unknown tokens. Specials ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` take ids 0, 1, 2.

Documents are separated by ``eos_id`` in a token stream (see ``minigpt.data``); a char tokenizer
has an EOS id only when it was built with ``eos=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

__all__ = ["BOS", "EOS", "PAD", "Tokenizer", "load_tokenizer", "train_bpe", "train_char"]

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """A thin wrapper over a ``tokenizers.Tokenizer`` with the ids the trainer needs."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        model_type = json.loads(hf.to_str())["model"]["type"]
        if model_type == "WordLevel":
            self.kind = "char"
        elif model_type == "BPE":
            self.kind = "bpe"
        else:
            raise ValueError(
                f"unsupported tokenizer model {model_type!r}: minigpt reads only the 'char' "
                "(WordLevel) and 'bpe' (BPE) tokenizers it writes itself"
            )
        vocab = hf.get_vocab(with_added_tokens=True)
        self.bos_id: int | None = vocab.get(BOS)
        self.eos_id: int | None = vocab.get(EOS)
        self.pad_id: int | None = vocab.get(PAD)
        self._char_to_id = {t: i for t, i in vocab.items() if len(t) == 1} if self.kind == "char" else {}
        self._id_to_char = {i: t for t, i in vocab.items()} if self.kind == "char" else {}

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """The tokenizer whose ``tokenizer.json`` text is ``text`` (as stored inside a checkpoint)."""
        return cls(HFTokenizer.from_str(text))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        if self.kind == "char":
            try:
                return [self._char_to_id[c] for c in text]
            except KeyError as e:
                raise ValueError(
                    f"character {e.args[0]!r} is not in this character-level vocabulary "
                    f"({self.vocab_size} symbols); use only characters of the training text or a "
                    "BPE tokenizer (--tokenizer bpe), which encodes any text"
                ) from None
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts; BPE encodes them in parallel (Rust threads)."""
        if self.kind == "char":
            return [self.encode(t) for t in texts]
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are kept visible (an EOS shows where a document ends)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside this tokenizer's vocabulary [0, {self.vocab_size})")
        if self.kind == "char":
            return "".join(self._id_to_char[i] for i in ids)
        return self.hf.decode(ids, skip_special_tokens=False)

    def to_str(self) -> str:
        """The ``tokenizer.json`` text."""
        return self.hf.to_str()

    def fingerprint(self) -> str:
        """A sha256 of the tokenizer definition: part of the token-cache key."""
        return hashlib.sha256(self.to_str().encode()).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (``path`` may be a directory or a file name); returns the file."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_str(), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def train_char(texts: Iterable[str], eos: bool = False) -> Tokenizer:
    """A character-level tokenizer over every character in ``texts`` (sorted, as nanoGPT).

    ``eos=True`` appends an ``<|eos|>`` id after the characters, to mark document boundaries in
    multi-document corpora; a single text (Tiny Shakespeare) needs none.
    """
    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    if not chars:
        raise ValueError("cannot build a character tokenizer from empty text")
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=None))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    if eos:
        hf.add_special_tokens([EOS])
    return Tokenizer(hf)


def train_bpe(texts: Iterable[str], vocab_size: int = 20000, min_frequency: int = 2, show_progress: bool = True) -> Tokenizer:
    """A byte-level BPE tokenizer trained on ``texts`` with specials BOS/EOS/PAD at ids 0/1/2.

    Training runs in parallel on all cores (``tokenizers`` uses Rust threads; set
    ``RAYON_NUM_THREADS`` to limit it). ``vocab_size`` counts the 256 byte symbols and the specials.
    """
    if vocab_size < 256 + 3:
        raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE: use at least 259 (256 bytes + 3 specials)")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(_nonempty(texts), trainer=trainer)
    return Tokenizer(hf)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    n = 0
    for t in texts:
        if t:
            n += 1
            yield t
    if n == 0:
        raise ValueError("cannot train a BPE tokenizer on empty text")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read a ``tokenizer.json`` written by ``Tokenizer.save`` (``path``: the file or its directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: pass a tokenizer.json file or the directory holding one (every checkpoint directory has one)")
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{path} is not a valid tokenizer.json ({e}); re-create it with minigpt.tokenizer.train_char/train_bpe") from None
    return Tokenizer(hf)
