"""Tokenizers: char and byte-level BPE round trips, specials, save/load, HF-compatibility."""

import random

import pytest
from conftest import FIXTURES, real_corpus

from minigpt.tokenizer import BOS, EOS, PAD, load_tokenizer, train_bpe, train_char


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return (FIXTURES / "shakespeare_head.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bpe():
    text = (FIXTURES / "tinystories_head.txt").read_text(encoding="utf-8")[:150_000]
    return train_bpe(text.split("\n\n"), vocab_size=400, show_progress=False)


def test_char_vocab_matches_nanogpt():
    shakespeare = real_corpus("shakespeare").read_text(encoding="utf-8")
    tok = train_char([shakespeare])
    chars = sorted(set(shakespeare))
    assert tok.kind == "char" and tok.vocab_size == 65 == len(chars)
    assert tok.eos_id is None
    sample = shakespeare[1000:3000]
    assert tok.encode(sample) == [chars.index(c) for c in sample]
    assert tok.decode(tok.encode(shakespeare)) == shakespeare


def test_char_eos_and_unknown_character():
    tok = train_char(["abc", "cde\n"], eos=True)
    assert tok.vocab_size == 7 and tok.eos_id == 6
    assert tok.decode([*tok.encode("a\nbe"), tok.eos_id]) == "a\nbe" + EOS
    with pytest.raises(ValueError, match="not in this character-level vocabulary"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([7])
    with pytest.raises(ValueError, match="empty"):
        train_char([""])


def test_bpe_specials_and_size(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == 400
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)
    assert bpe.hf.id_to_token(1) == EOS and bpe.hf.id_to_token(0) == BOS and bpe.hf.id_to_token(2) == PAD
    assert len(bpe.encode("Once upon a time, there was a little girl.")) < len("Once upon a time, there was a little girl.")
    # the literal text of a special encodes to its id (as HF tokenizers do), and decodes back
    ids = bpe.encode("x" + EOS)
    assert ids[-1] == bpe.eos_id and bpe.decode(ids) == "x" + EOS


def test_bpe_round_trips_any_text(bpe):
    rng = random.Random(0)
    alphabet = "abcXYZ \n\t.,!?-'\"0123456789éüßπ中文🙂\u200b"
    for _ in range(30):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        assert bpe.decode(bpe.encode(s)) == s
    batch = ["Lily had a cat.", "", "Ben ran fast 🙂"]
    assert bpe.encode_batch(batch) == [bpe.encode(s) for s in batch]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load(tmp_path, kind, bpe, shakespeare):
    tok = bpe if kind == "bpe" else train_char([shakespeare], eos=True)
    f = tok.save(tmp_path / "run")
    assert f.name == "tokenizer.json"
    for path in (tmp_path / "run", f):
        back = load_tokenizer(path)
        assert back.kind == kind and back.vocab_size == tok.vocab_size and back.eos_id == tok.eos_id
        assert back.fingerprint() == tok.fingerprint()
        text = shakespeare[5000:6500]
        assert back.encode(text) == tok.encode(text)


def test_saved_files_load_in_transformers(tmp_path, bpe, shakespeare):
    """The tokenizer.json shipped with an export is read by HF's fast tokenizer the same way."""
    from transformers import PreTrainedTokenizerFast

    text = shakespeare[:2000]
    for tok in (bpe, train_char([shakespeare])):
        hf = PreTrainedTokenizerFast(tokenizer_file=str(tok.save(tmp_path / tok.kind)))
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"not a valid tokenizer\.json"):
        load_tokenizer(bad)
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["abc"], vocab_size=100)
