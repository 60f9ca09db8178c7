"""A small fake lorafold server (FastAPI + real uvicorn on loopback) that speaks the HTTP contract.

It is not the real server: it answers canned generations, keeps adapters in a dict, and can be
scripted to fail (`state.script[path] = [(status, body, headers), ...]`, consumed one per request)
so the clients' error mapping, retries and streaming can be tested over real sockets.

Magic prompts: "__slow__" answers after 1.5 s; "__forever__" streams until the client hangs up
(then sets `state.disconnected`); "__truncate__" streams without [DONE]; "__error_event__" sends an
error event mid-stream.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

API_KEY, ADMIN_KEY, BASE = "sk-test", "adm-test", "smol-base"
CREATED = 1_700_000_000
TOKENS = ["Hello", ",", " wor", "ld", "!"]


@dataclass
class FakeState:
    script: dict[str, list[tuple[int, Any, dict[str, str]]]] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)
    auth: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Authorization header)
    bodies: list[tuple[str, Any]] = field(default_factory=list)
    uploads: list[dict[str, Any]] = field(default_factory=list)
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    ready: bool = True
    disconnected: threading.Event = field(default_factory=threading.Event)

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


def error(status: int, message: str, type_: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def adapter_info(name: str, source: str, size: int) -> dict[str, Any]:
    return {"name": name, "rank": 16, "ranks": [8, 16], "targets": ["q_proj", "v_proj"], "size_bytes": size,
            "content_hash": "ab" * 32, "tier": "cpu", "last_used": None, "requests_served": 0, "source": source,
            "registered_at": CREATED + 5.5}


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """field name → (filename, bytes), parsed with the stdlib (FastAPI's Form needs python-multipart)."""
    raw = f"Content-Type: {content_type}\r\n\r\n".encode() + body
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    parts = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        parts[name] = (part.get_filename(), part.get_payload(decode=True))
    return parts


def sse_pieces(events: list[dict[str, Any]], done: bool = True) -> list[bytes]:
    """The SSE bytes of `events`, cut into pieces that split the `data:` prefix and the JSON."""
    wire = b": keep-alive comment\n\n" + b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    if done:
        wire += b"data: [DONE]\n\n"
    cuts = list(range(0, len(wire), 23)) + [len(wire)]
    return [wire[a:b] for a, b in zip(cuts, cuts[1:])]


def completion_chunks(model: str, chat: bool) -> list[dict[str, Any]]:
    out = []
    for i, tok in enumerate(TOKENS):
        last = i == len(TOKENS) - 1
        if chat:
            choice = {"index": 0, "delta": {"role": "assistant", "content": tok} if i == 0 else {"content": tok},
                      "finish_reason": "stop" if last else None}
        else:
            choice = {"index": 0, "text": tok, "finish_reason": "stop" if last else None, "logprobs": None}
        out.append({"id": "cmpl-1", "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": CREATED, "model": model, "choices": [choice]})
    return out


class HangupWatch(StreamingResponse):
    """A never-ending stream that sets `state.disconnected` once the client hangs up.

    Watched here, not in the generator's `finally`: Starlette cancels the task that drives
    the generator, and when the cancellation lands in `send` the generator is only finalized
    later by the garbage collector.
    """

    state: FakeState

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # the body never ends, so returning means the client disconnected
            self.state.disconnected.set()


def build_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def record_and_script(request: Request, call_next):
        path = request.url.path
        state.calls[path] += 1
        state.auth.append((path, request.headers.get("authorization")))
        queue = state.script.get(path)
        if queue:
            status, body, headers = queue.pop(0)
            if isinstance(body, str):
                return PlainTextResponse(body, status_code=status, headers=headers)
            return JSONResponse(body, status_code=status, headers=headers)
        admin = path.startswith(("/v1/adapters", "/v1/load_lora", "/v1/unload_lora"))
        want = ADMIN_KEY if admin else API_KEY
        if path.startswith("/v1/") and request.headers.get("authorization") != f"Bearer {want}":
            return error(401, f"invalid {'admin' if admin else 'API'} key", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        return {"status": "ready"} if state.ready else error(503, "warming up", "server_unavailable")

    @app.get("/v1/models")
    async def models():
        data = [{"id": BASE, "object": "model", "owned_by": "lorafold", "parent": None, "root": BASE}]
        data += [{"id": n, "object": "model", "owned_by": "lorafold", "parent": BASE, "root": BASE}
                 for n in state.adapters]
        return {"object": "list", "data": data}

    async def generate(request: Request, chat: bool) -> Response:
        body = await request.json()
        state.bodies.append((request.url.path, body))
        model = body.get("model")
        if model != BASE and model not in state.adapters:
            return error(404, f"model '{model}' does not exist; GET /v1/models lists them", "not_found_error")
        if body.get("n", 1) != 1:
            return error(400, "n must be 1", "invalid_request_error")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if prompt == "__slow__":
            await asyncio.sleep(1.5)
        if body.get("stream"):
            cls = HangupWatch if prompt == "__forever__" else StreamingResponse
            response = cls(stream(prompt, model, chat, request), media_type="text/event-stream")
            response.state = state
            return response
        text = "".join(TOKENS)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                  if chat else {"index": 0, "text": text, "finish_reason": "length", "logprobs": None})
        return JSONResponse({"id": "cmpl-1", "object": "chat.completion" if chat else "text_completion",
                             "created": CREATED, "model": model, "choices": [choice],
                             "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}})

    async def stream(prompt: str, model: str, chat: bool, request: Request):
        chunks = completion_chunks(model, chat)
        if prompt == "__forever__":
            while True:  # until Starlette sees the client hang up and cancels the response
                for piece in sse_pieces(chunks[:1], done=False):
                    yield piece
                await asyncio.sleep(0.01)
        if prompt == "__error_event__":
            chunks = chunks[:2] + [{"error": {"message": "engine crashed", "type": "server_error", "code": 500}}]
        for piece in sse_pieces(chunks, done=prompt != "__truncate__"):
            yield piece
            await asyncio.sleep(0.002)  # separate TCP writes: lines arrive split across reads

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/adapters")
    async def register(request: Request):
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            parts = parse_multipart(ctype, await request.body())
            state.uploads.append(parts)
            name = parts["name"][1].decode()
            info = adapter_info(name, "upload", len(parts["weights"][1]))
        else:
            body = await request.json()
            state.bodies.append(("/v1/adapters", body))
            if body["path"].startswith("/"):
                return error(400, "path must be relative to the adapter root", "invalid_request_error")
            name, info = body["name"], adapter_info(body["name"], body["path"], 1 << 20)
        status = 200 if name in state.adapters else 201
        state.adapters[name] = info
        return JSONResponse(info, status_code=status)

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"object": "list", "data": list(state.adapters.values())}

    @app.get("/v1/adapters/{name}")
    async def get_adapter(name: str):
        if name not in state.adapters:
            return error(404, f"adapter '{name}' is not registered", "not_found_error")
        return state.adapters[name]

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        if state.adapters.pop(name, None) is None:
            return error(404, f"adapter '{name}' is not registered", "not_found_error")
        return {"deleted": name}

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request):
        body = await request.json()
        state.adapters[body["lora_name"]] = adapter_info(body["lora_name"], body["lora_path"], 1)
        return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request):
        body = await request.json()
        state.adapters.pop(body["lora_name"], None)
        return PlainTextResponse("Success")

    return app


class FakeServer:
    """Serves `build_app(state)` with uvicorn on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self) -> None:
        self.state = FakeState()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(build_app(self.state), log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> FakeServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._sock.close()


def closed_port_url() -> str:
    """A loopback URL nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
