"""Data: finding corpora, splits, the token cache, batch windows and bits per byte."""

import hashlib
import http.server
import json
import lzma
import math
import threading
import urllib.error

import numpy as np
import pytest
import torch
from conftest import FIXTURES, real_corpus

import minigpt.data as data
from minigpt.data import (
    BatchSampler,
    DataIntegrityError,
    DataNotFoundError,
    DownloadError,
    KnownCorpus,
    TokenData,
    bits_per_byte,
    download,
    eval_batches,
    find_data_file,
    load_corpus,
    parse_gutenberg,
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
    path = real_corpus("shakespeare")
    c = load_corpus("shakespeare")
    assert c.mode == "by-character"
    assert [len(d) for d in c.train] == [1_003_854] and [len(d) for d in c.val] == [111_540]
    assert c.train[0][-20:] + c.val[0][:20] in path.read_text()


def test_tinystories_split_by_story():
    real_corpus("tinystories")
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
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 has no string 'text'"):
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


class _Server:
    """A local HTTP server on 127.0.0.1 serving ``files`` (path -> bytes), with HTTP Range support.

    ``honour_range=False`` answers every request with the whole file (a server without resume);
    ``cut_after=n`` sends the full Content-Length but closes the connection after n body bytes,
    once. ``requests`` records (path, Range header) of every request.
    """

    def __init__(self, files):
        self.files, self.requests, self.honour_range, self.cut_after = files, [], True, None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(rng[len("bytes=") :].rstrip("-")) if rng and server.honour_range else 0
                if start >= len(body) and start:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if server.cut_after is not None:
                    self.wfile.write(body[start : start + server.cut_after])
                    server.cut_after = None
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = _Server({})
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def empty_dirs(tmp_path, monkeypatch):
    """No corpus anywhere: an empty MINIGPT_DATA_DIR, shared dir and user cache; online allowed."""
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MINIGPT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_shared_data_dir", lambda: tmp_path / "shared")
    return tmp_path / "cache" / "minigpt"


def test_shakespeare_download_cached_and_checked(server, empty_dirs, monkeypatch):
    body = (FIXTURES / "shakespeare_head.txt").read_bytes()
    server.files["/input.txt"] = body
    monkeypatch.setenv("MINIGPT_SHAKESPEARE_URL", server.url + "/input.txt")
    spec = data.KNOWN_CORPORA["shakespeare"]
    monkeypatch.setitem(data.KNOWN_CORPORA, "shakespeare", KnownCorpus(spec.relpath, hashlib.sha256(body).hexdigest(), spec.sources, None, spec.how))
    path = find_data_file("shakespeare", progress=False)
    assert path == empty_dirs / "tinyshakespeare" / "input.txt" and path.read_bytes() == body
    assert server.requests == [("/input.txt", None)]
    assert find_data_file("shakespeare") == path and len(server.requests) == 1  # cached: no second request
    assert load_corpus("shakespeare").train[0] == body.decode()[: int(len(body) * 0.9)]

    server.files["/input.txt"] = body.replace(b"Citizen", b"Citizne")  # upstream changed
    path.unlink()
    (empty_dirs / "downloads" / "shakespeare" / "input.txt").unlink()
    with pytest.raises(DataIntegrityError, match=r"expected .*upstream file changed"):
        find_data_file("shakespeare", progress=False)
    assert not path.exists()


def test_download_resumes_with_range(server, tmp_path):
    body = bytes(range(256)) * 4000
    server.files["/f.bin"] = body
    dest = tmp_path / "f.bin"
    server.cut_after = 300_000  # the connection drops mid-transfer
    with pytest.raises(DownloadError, match="run again to resume"):
        download(server.url + "/f.bin", dest, progress=False)
    part = tmp_path / "f.bin.part"
    assert not dest.exists() and 0 < part.stat().st_size < len(body)
    have = part.stat().st_size
    assert download(server.url + "/f.bin", dest, progress=False).read_bytes() == body
    assert server.requests[-1] == ("/f.bin", f"bytes={have}-") and not part.exists()


def test_download_without_range_support_and_complete_part(server, tmp_path):
    body = b"0123456789" * 1000
    server.files["/f.bin"] = body
    (tmp_path / "a.bin.part").write_bytes(b"garbage-")
    server.honour_range = False  # the server sends the whole file: the part is replaced, not appended to
    assert download(server.url + "/f.bin", tmp_path / "a.bin", progress=False).read_bytes() == body
    server.honour_range = True
    (tmp_path / "b.bin.part").write_bytes(body)  # a complete part: the server answers 416
    assert download(server.url + "/f.bin", tmp_path / "b.bin", progress=False).read_bytes() == body
    with pytest.raises(urllib.error.HTTPError, match="404"):
        download(server.url + "/missing", tmp_path / "c.bin", progress=False)


def test_tinystories_rebuilt_from_hub_file(server, empty_dirs, monkeypatch, tinystories_text):
    stories = [s for s in tinystories_text.split("\n\n") if s][:40]
    raw = "\n<|endoftext|>\n".join(stories[:30]) + "\n<|endoftext|>\n"
    server.files["/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt"] = raw.encode()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    budget = sum(len(s.encode()) + 2 for s in stories[:20]) + 5  # room for 20 stories, not 21
    monkeypatch.setattr(data, "_TINYSTORIES_BYTES", budget)
    expected = "".join(s + "\n\n" for s in stories[:20])
    spec = data.KNOWN_CORPORA["tinystories"]
    pinned = KnownCorpus(spec.relpath, hashlib.sha256(expected.encode()).hexdigest(), spec.sources, spec.build, spec.how)
    monkeypatch.setitem(data.KNOWN_CORPORA, "tinystories", pinned)
    path = find_data_file("tinystories", progress=False)
    assert path.read_text() == expected
    assert len(server.requests) == 1


def test_tinystories_rule_reproduces_our_file():
    """Our tinystories_val_794k.txt is whole stories each followed by a blank line, 794,375 bytes."""
    text = real_corpus("tinystories").read_text()
    assert len(text.encode()) == data._TINYSTORIES_BYTES and text.endswith("\n\n") and not text.endswith("\n\n\n")


def test_parse_gutenberg():
    alice = parse_gutenberg((FIXTURES / "gutenberg" / "pg11.txt").read_text())
    assert alice["title"] == "Alice's Adventures in Wonderland" and alice["author"] == "Lewis Carroll"
    assert alice["text"].startswith("Alice's Adventures in Wonderland\n\nby Lewis Carroll")  # producer credit dropped
    assert alice["text"].endswith('"without pictures or conversations?"')
    assert parse_gutenberg((FIXTURES / "gutenberg" / "pg12.txt").read_text()) is None  # French
    tm = parse_gutenberg((FIXTURES / "gutenberg" / "pg35.txt").read_bytes().decode())  # CRLF
    assert tm["title"] == "The Time Machine" and "\r" not in tm["text"] and tm["text"].startswith("The Time Machine\n\nAn Invention")
    assert parse_gutenberg("Title: x\nLanguage: English\nno markers") is None


def test_gutenberg_rebuilt_from_mirror(server, empty_dirs, monkeypatch):
    for i in (11, 12, 35):
        server.files[f"/cache/epub/{i}/pg{i}.txt"] = (FIXTURES / "gutenberg" / f"pg{i}.txt").read_bytes()
    monkeypatch.setenv("MINIGPT_GUTENBERG_URL", server.url + "/cache/epub/{id}/pg{id}.txt")
    monkeypatch.setattr(data, "_GUTENBERG_IDS", range(10, 40))  # ids without a file answer 404 and are skipped
    path = find_data_file("gutenberg", progress=False)
    with lzma.open(path, "rt", encoding="utf-8") as f:
        books = [json.loads(line) for line in f]
    assert [b["title"] for b in books] == ["Alice's Adventures in Wonderland", "The Time Machine"]
    assert books[1]["author"] == "H. G. Wells" and len(server.requests) == 30
    assert load_corpus("gutenberg", val_fraction=0.5).mode == "by-document"

    monkeypatch.setattr(data, "_GUTENBERG_TEXT_BYTES", 10)  # the budget stops the build after the first book
    monkeypatch.setattr(data, "_GUTENBERG_IDS", range(10, 100))
    path.unlink()
    find_data_file("gutenberg", progress=False)
    assert len(server.requests) == 30  # every book came from the download cache, missing ids were remembered
    with lzma.open(path, "rt", encoding="utf-8") as f:
        assert len(f.readlines()) == 1


def test_download_failure_is_data_not_found(server, empty_dirs, monkeypatch):
    monkeypatch.setenv("MINIGPT_SHAKESPEARE_URL", server.url + "/nothing-here.txt")
    with pytest.raises(DataNotFoundError, match=r"download from http://127.0.0.1:\d+/nothing-here.txt failed: HTTP Error 404"):
        find_data_file("shakespeare", progress=False)


def test_token_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"doc {i} " + "ab" * i}) for i in range(20)))
    corpus = load_corpus(str(f), val_fraction=0.2)
    tok = train_char(corpus.train + corpus.val, eos=True)
    cache = tmp_path / "cache"
    td = tokenize_split(corpus, "train", tok, cache, progress=False)
    expected = []
    for d in corpus.train:
        expected += [*tok.encode(d), tok.eos_id]
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


def test_bpe_tokenization_of_long_document_is_chunk_invariant(tinystories_text):
    text = tinystories_text[:60_000]
    tok = train_bpe(text.split("\n\n"), vocab_size=300, show_progress=False)
    chunks = list(data._chunks(text, 3000))
    assert len(chunks) > 10 and "".join(chunks) == text
    assert [t for ids in tok.encode_batch(chunks) for t in ids] == tok.encode(text)


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
        ((x, y),) = single.next_step()
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
    assert all(torch.equal(a, b) for a, b in zip(one, [x for x, _ in eval_batches(td, 8, 4, 5, seed=2)], strict=True))
    r0 = [x for x, _ in eval_batches(td, 8, 2, 5, seed=2, rank=0, world_size=2)]
    r1 = [x for x, _ in eval_batches(td, 8, 2, 5, seed=2, rank=1, world_size=2)]
    assert all(torch.equal(torch.cat([a, b]), x) for a, b, x in zip(r0, r1, one, strict=True))


def test_bits_per_byte():
    # 2.0 nats/token, 1000 tokens for 4000 bytes -> 0.5 nats/byte -> 0.5/ln 2 bits/byte
    assert bits_per_byte(2.0, 1000, 4000) == pytest.approx(0.5 / math.log(2))
    # a char model on ASCII text: tokens == bytes, so bpb is just the loss in bits
    assert bits_per_byte(1.4697, 10, 10) == pytest.approx(1.4697 / math.log(2))
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 1, 0)
