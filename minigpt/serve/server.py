"""An OpenAI-compatible completions server over the ``Engine`` (Starlette + uvicorn).

``python -m minigpt serve --ckpt DIR`` serves ``GET /health``, ``GET /v1/models`` and
``POST /v1/completions`` (prompt as a string or a list of strings; ``max_tokens``,
``temperature``, ``top_p``, ``seed``, ``stop``, ``stream`` as server-sent events), so the
official ``openai`` client works unchanged.

One background thread owns the engine and calls ``engine.step()`` while there is work; request
handlers on the event loop submit prompts and read ``StepOutput``s from an asyncio queue. So a
request arriving mid-generation joins the running batch at the next step (continuous batching),
and a client that disconnects mid-stream has its requests aborted and its KV blocks freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from minigpt.tokenizer import Tokenizer

from .engine import Engine, StepOutput
from .params import SamplingParams

__all__ = ["EngineLoop", "build_app", "serve"]

log = logging.getLogger("minigpt.serve")


class EngineLoop:
    """Steps the engine in a background thread; ``submit`` and ``abort`` are safe from any thread."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="minigpt-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, prompt_ids: list[int], params: SamplingParams, queue: asyncio.Queue) -> str:
        """Queue a request whose ``StepOutput``s go to ``queue``; raises ValueError for a bad request."""
        loop = asyncio.get_running_loop()
        with self._lock:
            rid = self.engine.add_request(prompt_ids, params, request_id=uuid.uuid4().hex)
            self._queues[rid] = (loop, queue)
        self._wake.set()
        return rid

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)
            self._queues.pop(request_id, None)

    def stats(self) -> dict:
        with self._lock:
            return self.engine.stats()

    def _deliver(self, out: Any, request_id: str, final: bool) -> None:
        entry = self._queues.pop(request_id, None) if final else self._queues.get(request_id)
        if entry is not None:
            loop, queue = entry
            loop.call_soon_threadsafe(queue.put_nowait, out)

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                busy = self.engine.has_unfinished() or bool(self.engine._pending)
                try:
                    outs = self.engine.step() if busy else []
                except Exception as e:  # a failing step must not hang the clients: fail their requests
                    log.exception("engine step failed")
                    for rid in list(self._queues):
                        self.engine.abort(rid)
                        self._deliver(e, rid, final=True)
                    outs = []
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            for out in outs:
                self._deliver(out, out.request_id, final=out.finished)


# ---------------------------------------------------------------------------- request parsing
class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type_: str = "invalid_request_error") -> JSONResponse:
    """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"'{name}' must be a number, got {type(v).__name__}", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise BadRequest(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return v


@dataclass
class CompletionRequest:
    prompts: list[str]
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def parse_completion(body: Any, model_name: str) -> CompletionRequest:
    """Validate a ``/v1/completions`` body; raises ``BadRequest`` naming the offending field."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise BadRequest("'model' is required and must be a string", "model")
    if model != model_name:
        raise BadRequest(f"model '{model}' does not exist; this server serves '{model_name}'", "model", 404, "model_not_found")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    else:
        raise BadRequest("'prompt' must be a string or a non-empty list of strings", "prompt")
    max_tokens = body.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = 16
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(f"'max_tokens' must be an integer >= 1, got {max_tokens!r}", "max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("'seed' must be an integer", "seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 non-empty strings", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    for name, allowed in (("n", (None, 1)), ("best_of", (None, 1)), ("echo", (None, False)), ("logprobs", (None,)),
                          ("suffix", (None,)), ("presence_penalty", (None, 0)), ("frequency_penalty", (None, 0))):
        if body.get(name) not in allowed or (isinstance(body.get(name), bool) and name != "echo"):
            raise BadRequest(f"'{name}' is not supported by this server (allowed: {allowed})", name)
    return CompletionRequest(prompts, max_tokens, float(temperature), None if top_p == 1.0 else float(top_p),
                             seed, stop, stream, bool(opts.get("include_usage")))


# ---------------------------------------------------------------------------- one choice
@dataclass
class _Choice:
    """One prompt's output: turns token ids into text, applies stop strings, holds back partial text."""

    index: int
    request_id: str
    prompt_tokens: int
    stops: list[str]
    eos_id: int | None
    tokens: list[int] = field(default_factory=list)
    num_generated: int = 0
    text: str = ""
    sent: int = 0
    finish_reason: str | None = None

    def feed(self, out: StepOutput, tok: Tokenizer) -> bool:
        """Take one engine output; True if a stop string ended the choice (the engine must abort it)."""
        self.num_generated += len(out.new_token_ids)
        self.tokens += [t for t in out.new_token_ids if t != self.eos_id]
        self.text = tok.decode(self.tokens)
        if out.finished:
            self.finish_reason = out.finish_reason
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            stopped_early = self.finish_reason is None
            self.finish_reason = "stop"
            return stopped_early
        return False

    def delta(self) -> str:
        """Text not yet sent that can no longer change (a stop string or a multi-byte char may be pending)."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= max((len(s) - 1 for s in self.stops), default=0)
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.sent:
            return ""
        d, self.sent = self.text[self.sent:end], end
        return d


# ---------------------------------------------------------------------------- the app
def build_app(engine: Engine, tokenizer: Tokenizer, model_name: str = "minigpt") -> Starlette:
    """The ASGI app; the engine loop starts and stops with the app's lifespan."""
    loop_ = EngineLoop(engine)
    created = int(time.time())
    eos_id = tokenizer.eos_id

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", **loop_.stats()})

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "minigpt",
             "max_model_len": engine.max_seq_len}]})

    def _start(req: CompletionRequest, queue: asyncio.Queue) -> list[_Choice]:
        encoded = []
        for text in req.prompts:
            try:
                ids = tokenizer.encode(text)
            except ValueError as e:
                raise BadRequest(str(e), "prompt") from None
            if not ids:
                from minigpt.train import start_ids

                ids = start_ids(tokenizer)
            encoded.append(ids)
        choices: list[_Choice] = []
        try:
            for i, ids in enumerate(encoded):
                params = SamplingParams(req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                        seed=None if req.seed is None else req.seed + i,
                                        stop_token_ids=() if eos_id is None else (eos_id,))
                rid = loop_.submit(ids, params, queue)
                choices.append(_Choice(i, rid, len(ids), req.stop, eos_id))
        except ValueError as e:
            for c in choices:
                loop_.abort(c.request_id)
            raise BadRequest(str(e), "prompt") from None
        return choices

    async def _next(queue: asyncio.Queue, by_id: dict[str, _Choice]) -> _Choice | None:
        """Apply the next engine output to its choice; returns the choice (None for a stale output)."""
        out = await queue.get()
        if isinstance(out, Exception):
            raise out
        c = by_id.get(out.request_id)
        if c is None or c.finish_reason is not None:
            return None
        if c.feed(out, tokenizer):
            loop_.abort(c.request_id)
        return c

    def _usage(choices: list[_Choice]) -> dict:
        p, n = sum(c.prompt_tokens for c in choices), sum(c.num_generated for c in choices)
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

    def _log(cid: str, choices: list[_Choice], t0: float, ttft: float | None, status: str) -> None:
        dt = time.perf_counter() - t0
        u = _usage(choices)
        log.info("%s %s prompts=%d prompt_tokens=%d completion_tokens=%d finish=%s latency=%.3fs ttft=%s tok/s=%.1f",
                 cid, status, len(choices), u["prompt_tokens"], u["completion_tokens"],
                 ",".join(str(c.finish_reason) for c in choices), dt,
                 "-" if ttft is None else f"{ttft:.3f}s", u["completion_tokens"] / dt if dt > 0 else 0.0)

    async def completions(request: Request):
        t0 = time.perf_counter()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error_response(400, f"the request body is not valid JSON: {e}")
        try:
            req = parse_completion(body, model_name)
            queue: asyncio.Queue = asyncio.Queue()
            choices = _start(req, queue)
        except BadRequest as e:
            return error_response(e.status, e.message, e.param, e.code)
        by_id = {c.request_id: c for c in choices}
        cid = "cmpl-" + uuid.uuid4().hex[:24]
        base = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_name}

        def abort_unfinished() -> None:
            for c in choices:
                if c.finish_reason is None:
                    loop_.abort(c.request_id)

        if not req.stream:
            try:
                ttft = None
                while any(c.finish_reason is None for c in choices):
                    await _next(queue, by_id)
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
            except Exception as e:
                abort_unfinished()
                log.exception("%s failed", cid)
                return error_response(500, f"generation failed: {e}", type_="server_error")
            finally:
                if any(c.finish_reason is None for c in choices):
                    abort_unfinished()
            _log(cid, choices, t0, ttft, "done")
            return JSONResponse({**base, "choices": [
                {"text": c.text, "index": c.index, "logprobs": None, "finish_reason": c.finish_reason} for c in choices],
                "usage": _usage(choices)})

        async def events():
            ttft, status = None, "disconnected"
            try:
                while any(c.finish_reason is None for c in choices):
                    c = await _next(queue, by_id)
                    if c is None:
                        continue
                    text = c.delta()
                    if text or c.finish_reason is not None:
                        ttft = ttft if ttft is not None else time.perf_counter() - t0
                        chunk = {**base, "choices": [{"text": text, "index": c.index, "logprobs": None,
                                                      "finish_reason": c.finish_reason}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                if req.include_usage:
                    yield f"data: {json.dumps({**base, 'choices': [], 'usage': _usage(choices)})}\n\n"
                yield "data: [DONE]\n\n"
                status = "done"
            except Exception as e:  # an engine failure mid-stream: tell the client in-band
                status = "failed"
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
            finally:  # also runs when the client disconnects (the generator is closed or cancelled)
                abort_unfinished()
                _log(cid, choices, t0, ttft, status)

        return StreamingResponse(events(), media_type="text/event-stream")

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code in (404, 405):  # a route this server lacks (e.g. /v1/chat/completions) or the wrong method
            message = f"{request.method} {request.url.path}: {message}; this server answers {ROUTES}"
        return error_response(exc.status_code, message, code=None,
                              type_="invalid_request_error" if exc.status_code < 500 else "server_error")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop_.start()
        try:
            yield
        finally:
            loop_.stop()

    app = Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ], exception_handlers={HTTPException: http_error}, lifespan=lifespan)  # type: ignore[dict-item]
    app.state.engine_loop = loop_
    return app


ROUTES = "GET /health, GET /v1/models and POST /v1/completions (no chat endpoint: send the prompt as text)"


def check_port_free(host: str, port: int) -> None:
    """Raise a one-line ValueError if ``host:port`` cannot be bound (in use, or not this machine's address)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: a TCP port is 0-65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed server's TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}): pass another --port, or stop what uses it") from None


def serve(ckpt: str, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 64,
          max_num_tokens: int = 8192, device: str | None = None, model_name: str | None = None) -> None:
    """Load a checkpoint and serve it until interrupted (``python -m minigpt serve``)."""
    import uvicorn

    from minigpt.checkpoint import load_model
    from minigpt.runtime import dtype as runtime_dtype
    from minigpt.runtime import pick_device

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_port_free(host, port)  # before loading the model: a taken port is the commonest start-up failure
    dev = pick_device(device)
    model, tok, _ = load_model(ckpt, dev)
    if dev.type == "cuda":
        model = model.to(runtime_dtype())
    engine = Engine(model, max_batch_size=max_batch_size, max_num_tokens=max_num_tokens)
    name = model_name or "minigpt"
    log.info("serving %s (%d parameters) on %s as model '%s' at http://%s:%d/v1", ckpt, model.num_params(), dev, name, host, port)
    uvicorn.run(build_app(engine, tok, name), host=host, port=port, log_level="info")
