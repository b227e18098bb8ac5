"""The OpenAI-compatible server on 127.0.0.1 with a tiny random model: openai client, streaming,
bad requests, disconnects, and a bounded concurrent load test."""

import http.client
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from minigpt.config import ModelConfig  # noqa: E402
from minigpt.model import MiniGPT  # noqa: E402
from minigpt.serve import Engine  # noqa: E402
from minigpt.serve.server import build_app  # noqa: E402
from minigpt.tokenizer import train_char  # noqa: E402

TEXT = "abcdefghijklmnopqrstuvwxyz .,\n"
CTX = 64


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    tok = train_char([TEXT])  # no EOS: every request runs to max_tokens unless a stop string hits
    model = MiniGPT(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                max_seq_len=CTX)).eval()
    engine = Engine(model, max_batch_size=16, max_num_tokens=256, block_size=8)
    app = build_app(engine, tok, "tiny")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    deadline = time.time() + 20
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield dict(port=sock.getsockname()[1], model=model, tok=tok, engine=engine)
    srv.should_exit = True
    th.join(timeout=10)


def _client(s):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{s['port']}/v1", api_key="x", max_retries=0, timeout=60)


def _greedy_text(s, prompt, n):
    ids = s["tok"].encode(prompt)
    out = s["model"].generate(torch.tensor([ids]), n, temperature=0)[0, len(ids):]
    return s["tok"].decode(out.tolist())


def _post(s, body, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", s["port"], timeout=30)
    conn.request("POST", "/v1/completions", body=raw if raw is not None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data)


def _wait_idle(s, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = s["engine"].stats()
        if st["blocks_used"] == 0 and st["num_running"] == 0 and st["num_waiting"] == 0:
            return st
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {s['engine'].stats()}")


def test_health_and_models(server):
    c = _client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=10)
    conn.request("GET", "/health")
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["status"] == "ok"


def test_openai_client_greedy_matches_model(server):
    c = _client(server)
    r = c.completions.create(model="tiny", prompt="hello world", max_tokens=12, temperature=0)
    assert r.choices[0].text == _greedy_text(server, "hello world", 12)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len("hello world")
    multi = c.completions.create(model="tiny", prompt=["abc", "the cat."], max_tokens=7, temperature=0)
    assert [ch.text for ch in sorted(multi.choices, key=lambda ch: ch.index)] == \
        [_greedy_text(server, "abc", 7), _greedy_text(server, "the cat.", 7)]


def test_openai_client_streaming(server):
    c = _client(server)
    chunks = list(c.completions.create(model="tiny", prompt="stream me", max_tokens=10, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == _greedy_text(server, "stream me", 10)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_and_seed(server):
    c = _client(server)
    full = _greedy_text(server, "xyz", 20)
    stop = full[5:7]
    r = c.completions.create(model="tiny", prompt="xyz", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="xyz", max_tokens=20, temperature=0, stop=stop, stream=True))
    assert streamed == r.choices[0].text
    a = c.completions.create(model="tiny", prompt="abc", max_tokens=15, temperature=1.0, top_p=0.9, seed=3)
    b = c.completions.create(model="tiny", prompt="abc", max_tokens=15, temperature=1.0, top_p=0.9, seed=3)
    assert a.choices[0].text == b.choices[0].text
    _wait_idle(server)


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny", "prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": 5}, 400, "prompt"),
    ({"model": "tiny", "prompt": "a" * CTX, "max_tokens": 4}, 400, "prompt"),
    ({"model": "tiny", "prompt": "A?"}, 400, "prompt"),  # characters outside the vocabulary
    ({"model": "tiny", "prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "a", "stream": "yes"}, 400, "stream"),
    ({"model": "tiny", "prompt": "a", "stop": [1]}, 400, "stop"),
    ({"model": "tiny", "prompt": "a", "n": 2}, 400, "n"),
    ({"prompt": "a"}, 400, "model"),
    ({"model": "gpt-9", "prompt": "a"}, 404, "model"),
    ([1, 2], 400, None),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    code, data = _post(server, body)
    assert code == status
    assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["param"] == param


def test_malformed_json_and_unknown_route(server):
    code, data = _post(server, None, raw="{not json")
    assert code == 400 and "JSON" in data["error"]["message"]
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=10)
    conn.request("POST", "/v1/chat/completions", body="{}")
    r = conn.getresponse()
    message = json.loads(r.read())["error"]["message"]
    assert r.status == 404 and "/v1/chat/completions" in message and "POST /v1/completions" in message
    conn.request("GET", "/v1/completions")
    r = conn.getresponse()
    assert r.status == 405 and "POST /v1/completions" in json.loads(r.read())["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        _client(server).completions.create(model="tiny", prompt="a", max_tokens=0)
    _wait_idle(server)


def test_client_disconnect_mid_stream_frees_blocks(server, monkeypatch):
    engine = server["engine"]
    step, abort, aborted = engine.step, engine.abort, []

    def slow_step():  # 60 tokens now take >= 1.2 s, so the stream is surely mid-way when we hang up
        time.sleep(0.02)
        return step()

    def spy_abort(rid):
        aborted.append(rid)
        return abort(rid)

    monkeypatch.setattr(engine, "step", slow_step)
    monkeypatch.setattr(engine, "abort", spy_abort)
    sock = socket.create_connection(("127.0.0.1", server["port"]), timeout=30)
    body = json.dumps({"model": "tiny", "prompt": "abc", "max_tokens": 60, "stream": True})
    sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    seen = b""
    while b"data:" not in seen:  # the stream has started
        seen += sock.recv(4096)
    assert engine.stats()["blocks_used"] > 0
    sock.close()
    _wait_idle(server)
    assert len(aborted) == 1


def test_load_many_concurrent_clients(server):
    c = _client(server)
    rng = random.Random(0)
    jobs = [("".join(rng.choice(TEXT[:26]) for _ in range(rng.randint(1, 20))), rng.randint(1, 24), bool(i % 2))
            for i in range(48)]

    def run(job):
        prompt, n, stream = job
        if stream:
            chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0.8,
                                               stream=True, stream_options={"include_usage": True}))
            return chunks[-1].usage.completion_tokens, "".join(ch.choices[0].text for ch in chunks if ch.choices)
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0.8)
        return r.usage.completion_tokens, r.choices[0].text

    t0 = time.time()
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    assert time.time() - t0 < 120  # bounded: a hang fails rather than stalls CI
    for (_, n, _), (count, text) in zip(jobs, results, strict=True):
        assert count == n and len(text) == n  # char tokenizer: one character per token
    _wait_idle(server)


def test_serve_cli_loads_a_checkpoint_and_answers(tmp_path, server):
    """`python -m minigpt serve --ckpt DIR` end to end: load, listen, answer, shut down on SIGINT."""
    import signal
    import subprocess
    import sys

    from minigpt.checkpoint import save_checkpoint

    model, tok = server["model"], server["tok"]
    save_checkpoint(tmp_path, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                               "train_config": {}, "tokenizer": tok.to_str(), "step": 0})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "minigpt", "serve", "--ckpt", str(tmp_path), "--port", str(port),
                             "--max-batch-size", "4", "--model-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                r = _post({"port": port}, {"model": "tiny", "prompt": "abc", "max_tokens": 5, "temperature": 0})
                break
            except ConnectionRefusedError:
                assert proc.poll() is None and time.time() < deadline, "server did not come up"
                time.sleep(0.2)
        assert r[0] == 200 and r[1]["choices"][0]["text"] == _greedy_text(server, "abc", 5)
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert "completion_tokens=5" in out  # the per-request INFO line
