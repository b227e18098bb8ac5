"""Data: finding corpora, splits, the token cache, batch windows and bits per byte."""

import json
import lzma
import math

import numpy as np
import pytest
import torch

import minigpt.data as data
from minigpt.data import (
    BatchSampler,
    DataNotFoundError,
    TokenData,
    bits_per_byte,
    eval_batches,
    find_data_file,
    load_corpus,
    split_documents,
    tokenize_split,
)
from minigpt.tokenizer import train_bpe, train_char


def _write_gutenberg(path, n_books=12):
    books = [{"author": f"A{i}", "title": f"Book {i}", "text": f"Book {i} chapter one.\n\n" + f"Word{i} " * (50 + 7 * i)} for i in range(n_books)]
    with lzma.open(path, "wt", encoding="utf-8") as f:
        for b in books:
            f.write(json.dumps(b) + "\n")
    return [b["text"] for b in books]


def test_shakespeare_split_matches_nanogpt():
    c = load_corpus("shakespeare")
    assert c.mode == "by-character"
    assert [len(d) for d in c.train] == [1_003_854] and [len(d) for d in c.val] == [111_540]
    assert c.train[0][-20:] + c.val[0][:20] in find_data_file("shakespeare").read_text()


def test_tinystories_split_by_story():
    c = load_corpus("tinystories")
    n = len(c.train) + len(c.val)
    assert c.mode == "by-document" and n > 1000
    assert len(c.val) == round(0.1 * n)
    assert not set(c.train) & set(c.val) or len(set(c.train + c.val)) < n  # no story is cut in two
    text = find_data_file("tinystories").read_text()
    assert all(s in text for s in c.val[:50])
    assert load_corpus("tinystories").val == c.val  # deterministic


def test_gutenberg_style_jsonl_xz_split_by_book(tmp_path):
    path = tmp_path / "books.jsonl.xz"
    texts = _write_gutenberg(path)
    c = load_corpus(str(path), val_fraction=0.25, seed=3)
    assert c.mode == "by-document" and len(c.val) == 3 and len(c.train) == 9
    assert sorted(c.train + c.val) == sorted(texts)
    assert [t for t in texts if t in c.val] == c.val  # corpus order kept
    assert load_corpus(str(path), val_fraction=0.25, seed=3).val == c.val
    assert load_corpus(str(path), val_fraction=0.25, seed=4).fingerprint != c.fingerprint


def test_gutenberg_found_through_env(tmp_path, monkeypatch):
    (tmp_path / "gutenberg").mkdir()
    _write_gutenberg(tmp_path / "gutenberg" / "gutenberg_en_100M.jsonl.xz")
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path))
    assert find_data_file("gutenberg") == tmp_path / "gutenberg" / "gutenberg_en_100M.jsonl.xz"
    assert len(load_corpus("gutenberg").train) == 11


def test_local_txt_and_bad_files(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("abcdefghij" * 10)
    c = load_corpus(str(f), val_fraction=0.2)
    assert c.train == ["abcdefghij" * 8] and c.val == ["abcdefghij" * 2] and c.name == "notes"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 has no string 'text'"):
        load_corpus(str(bad))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_corpus(str(tmp_path / "x.csv"))
    with pytest.raises(DataNotFoundError, match="neither a known corpus"):
        load_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents(["one"], 0.1)


def test_missing_file_offline_lists_search_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MINIGPT_OFFLINE", "1")
    monkeypatch.setattr(data, "_shared_data_dir", lambda: tmp_path / "shared")
    for name in ("shakespeare", "tinystories", "gutenberg"):
        with pytest.raises(DataNotFoundError) as e:
            find_data_file(name)
        msg = str(e.value)
        for d in ("env", "shared", "cache"):
            assert str(tmp_path / d) in msg
        assert "MINIGPT_DATA_DIR" in msg
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(ValueError, match="unknown corpus"):
        find_data_file("wikipedia")


def test_token_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"doc {i} " + "ab" * i}) for i in range(20)))
    corpus = load_corpus(str(f), val_fraction=0.2)
    tok = train_char(corpus.train + corpus.val, eos=True)
    cache = tmp_path / "cache"
    td = tokenize_split(corpus, "train", tok, cache, progress=False)
    expected = []
    for d in corpus.train:
        expected += tok.encode(d) + [tok.eos_id]
    assert td.tokens.dtype == np.uint16 and td.tokens.tolist() == expected
    assert td.n_bytes == sum(len(d.encode()) for d in corpus.train)

    calls = []
    monkeypatch.setattr(type(tok), "encode_batch", lambda self, texts: calls.append(1) or [self.encode(t) for t in texts])
    again = tokenize_split(corpus, "train", tok, cache, progress=False)
    assert again.path == td.path and not calls  # cache hit: nothing re-tokenised

    other_tok = train_char(corpus.train + corpus.val + ["xyz"], eos=True)
    assert tokenize_split(corpus, "train", other_tok, cache, progress=False).path != td.path and calls
    f.write_text(f.read_text() + "\n" + json.dumps({"text": "doc 99 abab"}))
    changed = load_corpus(str(f), val_fraction=0.2)
    assert tokenize_split(changed, "train", tok, cache, progress=False).path != td.path
    td.path.write_bytes(td.path.read_bytes()[:-2])  # a torn cache file is rebuilt, not trusted
    assert tokenize_split(corpus, "train", tok, cache, progress=False).tokens.tolist() == expected


def test_bpe_tokenization_of_long_document_is_chunk_invariant(tmp_path):
    text = find_data_file("tinystories").read_text()[:60_000]
    tok = train_bpe(text.split("\n\n"), vocab_size=300, show_progress=False)
    chunks = list(data._chunks(text, 3000))
    assert len(chunks) > 10 and "".join(chunks) == text
    assert sum(tok.encode_batch(chunks), []) == tok.encode(text)


def _token_data(n=1000, seed=0):
    tokens = np.random.default_rng(seed).integers(0, 60000, n).astype(np.uint16)
    return TokenData(tokens, n_bytes=3 * n, path=None)


def test_batches_are_shifted_windows():
    td = TokenData(np.arange(100, dtype=np.uint16), n_bytes=100, path=None)  # token i sits at offset i
    s = BatchSampler(td, block_size=17, batch_size=5, grad_accum=2, seed=1)
    seen = set()
    for _ in range(40):
        micro = s.next_step()
        assert len(micro) == 2
        for x, y in micro:
            assert x.shape == y.shape == (5, 17) and x.dtype == torch.int64
            assert torch.equal(y, x + 1)  # targets are the inputs shifted by one
            assert torch.equal(x, x[:, :1] + torch.arange(17))  # contiguous windows
            seen.update(x[:, 0].tolist())
    assert seen == set(range(100 - 17))  # every start offset, including the last one, is drawn


def test_ranks_partition_the_global_batch():
    td = _token_data()
    single = BatchSampler(td, 8, batch_size=6, grad_accum=1, seed=7)
    ranks = [BatchSampler(td, 8, batch_size=3, grad_accum=1, rank=r, world_size=2, seed=7) for r in range(2)]
    accum = BatchSampler(td, 8, batch_size=3, grad_accum=2, seed=7)
    for _ in range(3):
        (x, y), = single.next_step()
        parts = [r.next_step()[0] for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert torch.equal(torch.cat([m[0] for m in accum.next_step()]), x)
    assert not torch.equal(parts[0][0], parts[1][0])  # each rank reads its own slice


def test_sampler_state_round_trip():
    td = _token_data()
    a = BatchSampler(td, 8, 4, seed=3)
    a.next_step()
    state = a.state_dict()
    expected = a.next_step()[0][0]
    b = BatchSampler(td, 8, 4, seed=99)
    b.load_state_dict(state)
    assert torch.equal(b.next_step()[0][0], expected) and b.steps == 2


def test_sampler_errors():
    td = _token_data(20)
    with pytest.raises(ValueError, match="too few for block_size=64"):
        BatchSampler(td, 64, 2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        BatchSampler(_token_data(), 8, 0)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        BatchSampler(_token_data(), 8, 2, rank=2, world_size=2)


def test_eval_batches_fixed_and_sharded():
    td = _token_data()
    one = [x for x, _ in eval_batches(td, 8, 4, n_batches=5, seed=2)]
    assert len(one) == 5 and all(x.shape == (4, 8) for x in one)
    assert all(torch.equal(a, b) for a, b in zip(one, [x for x, _ in eval_batches(td, 8, 4, 5, seed=2)]))
    r0 = [x for x, _ in eval_batches(td, 8, 2, 5, seed=2, rank=0, world_size=2)]
    r1 = [x for x, _ in eval_batches(td, 8, 2, 5, seed=2, rank=1, world_size=2)]
    assert all(torch.equal(torch.cat([a, b]), x) for a, b, x in zip(r0, r1, one))


def test_bits_per_byte():
    # 2.0 nats/token, 1000 tokens for 4000 bytes -> 0.5 nats/byte -> 0.5/ln 2 bits/byte
    assert bits_per_byte(2.0, 1000, 4000) == pytest.approx(0.5 / math.log(2))
    # a char model on ASCII text: tokens == bytes, so bpb is just the loss in bits
    assert bits_per_byte(1.4697, 10, 10) == pytest.approx(1.4697 / math.log(2))
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 1, 0)
