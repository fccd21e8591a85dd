"""HTTP serving of an output directory with ONNX Runtime: the OpenAI chat-completions API (a subset).

    POST /v1/chat/completions   {"messages": [{"role": "user", "content": [
                                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
                                    {"type": "text", "text": "What is in the picture?"}]}],
                                 "max_tokens": 64, "stream": false}
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", ...}

What is taken: one user message (string content, or a list of ``text`` and ``image_url`` parts; images
go before the text, as ``run`` and the model families place them), ``max_tokens`` /
``max_completion_tokens``, ``temperature`` (absent or 0: greedy, as ``run``), ``top_p``, ``top_k`` (an
extension), ``seed``, ``stream`` (server-sent ``chat.completion.chunk`` events, then ``data: [DONE]``).
Images come inline as base64 ``data:`` URLs only: the server fetches nothing. Anything else that changes
the answer (several turns, a system message, ``n`` > 1, tools) is refused with a 400 and a one-line
message, never ignored.

One generation runs at a time (ONNX Runtime already spreads one over every core); other requests wait
for it, and ``/health`` answers meanwhile. Greedy answers are the tokens ``vlmq-export run`` gives.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..errors import VlmqError
from .generate import GRAPHS, OnnxVLM

MAX_BODY_BYTES = 32 << 20  # a request larger than this (inline images included) is refused with 413
DEFAULT_MAX_TOKENS = 64


class ServeError(VlmqError):
    """The server cannot start (address in use, ...)."""


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST, param: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.param = param


@dataclass
class ChatRequest:
    prompt: str
    images: list = field(default_factory=list)  # PIL images, RGB
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stream: bool = False

    @property
    def sample(self) -> bool:
        return self.temperature > 0


def decode_data_url(url: str, where: str):
    """A ``data:image/...;base64,...`` URL as a PIL RGB image, or a RequestError naming ``where``."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(url, str) or not url.startswith("data:"):
        raise RequestError(f"{where}: only inline data: URLs (base64) are accepted; this server fetches nothing",
                           param=where)
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise RequestError(f"{where}: expected data:<mime>;base64,<data>", param=where)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: invalid base64 data", param=where) from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise RequestError(f"{where}: not a readable image ({type(exc).__name__})", param=where) from None


def _number(body: dict, key: str, kind, default, lo=None, hi=None):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise RequestError(f"{key} must be {'an integer' if kind is int else 'a number'}", param=key)
    value = kind(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise RequestError(f"{key} must be {bounds}, got {value}", param=key)
    return value


def parse_chat_request(body, max_tokens_limit: int) -> ChatRequest:
    """The generation a chat-completions request body asks for, or a RequestError saying what is refused."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in messages]
        raise RequestError(f"exactly one user message is supported (got roles {roles}): several turns and system "
                           "messages are not implemented", param="messages")
    content = messages[0].get("content")
    texts, images = [], []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for i, part in enumerate(content):
            where = f"messages[0].content[{i}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url")
                images.append(decode_data_url(url.get("url") if isinstance(url, dict) else url, where))
            else:
                raise RequestError(f"{where}: expected a text or image_url part", param=where)
    else:
        raise RequestError("messages[0].content must be a string or a list of parts", param="messages")
    prompt = "\n".join(texts)
    if not prompt.strip():
        raise RequestError("the user message has no text", param="messages")
    n = _number(body, "n", int, 1)
    if n != 1:
        raise RequestError("n > 1 is not supported", param="n")
    for key in ("tools", "functions", "response_format", "logit_bias", "stop"):
        if body.get(key):
            raise RequestError(f"{key} is not supported", param=key)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", param="stream")
    return ChatRequest(
        prompt=prompt, images=images, stream=stream,
        max_tokens=_number(body, key, int, min(DEFAULT_MAX_TOKENS, max_tokens_limit), 1, max_tokens_limit),
        temperature=_number(body, "temperature", float, 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", float, 1.0, 1e-6, 1.0),  # 0 would leave no token to sample
        top_k=_number(body, "top_k", int, 0, 0, None),
        seed=_number(body, "seed", int, None),
    )


class _ClientGone(Exception):
    pass


def _finish_reason(res) -> str:
    return "stop" if res.stopped else "length"


class VLMServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer over one :class:`OnnxVLM`; generations take turns through ``lock``."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], vlm: OnnxVLM, model_name: str, max_tokens_limit: int = 1024,
                 log=None):
        try:
            super().__init__(address, _Handler)
        except OSError as exc:
            raise ServeError(f"cannot listen on {address[0]}:{address[1]}: {exc.strerror or exc}") from None
        self.vlm = vlm
        self.model_name = model_name
        self.max_tokens_limit = int(max_tokens_limit)
        self.lock = threading.Lock()
        self.log = log  # callable(str) for one line per request, or None
        self.started = time.time()

    def handle_error(self, request, client_address):  # one line, not the base class's traceback
        exc = sys.exc_info()[1]
        if self.log:
            self.log(f"{client_address[0]} connection error: {type(exc).__name__}: {exc}")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(out_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, accuracy_level: int | None = None,
                max_tokens_limit: int = 1024, log=None, providers=None) -> VLMServer:
    """Bind ``host:port`` (0: any free port) and open every graph of a complete output directory (so a
    broken one fails here, not on the first request). Call ``serve_forever()`` on the result."""
    from ..outdir import check_complete
    from .session import DEFAULT_ACCURACY_LEVEL

    out_dir = Path(out_dir)
    manifest = check_complete(out_dir, verify_hashes=False)
    level = DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level
    vlm = OnnxVLM(out_dir, accuracy_level=level, providers=providers)  # sessions open lazily
    name = out_dir.resolve().name or manifest.get("source", {}).get("model", "model")
    server = VLMServer((host, port), vlm, name, max_tokens_limit, log)  # a busy port fails before the loading
    try:
        for graph in GRAPHS:
            vlm.session(graph)
    except BaseException:
        server.server_close()
        raise
    return server


class _Handler(BaseHTTPRequestHandler):
    server: VLMServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        if self.server.log:
            self.server.log(f"{self.address_string()} {format % args}")

    # ------------------------------------------------------------------ replies
    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, message: str, param: str | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    # ------------------------------------------------------------------ routes
    def do_GET(self):  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self._send_json(HTTPStatus.OK, {"status": "ok", "model": self.server.model_name,
                                            "busy": self.server.lock.locked(),
                                            "accuracy_level": self.server.vlm.accuracy_level})
        elif path == "/v1/models":
            self._send_json(HTTPStatus.OK, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": int(self.server.started),
                 "owned_by": "vlmq-export"}]})
        else:
            self._send_error(HTTPStatus.NOT_FOUND, f"no route GET {path or '/'}")

    def do_POST(self):  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/v1/chat/completions":
            self._drain()
            self._send_error(HTTPStatus.NOT_FOUND, f"no route POST {path or '/'}")
            return
        try:
            req = parse_chat_request(self._read_json(), self.server.max_tokens_limit)
            prepared = self._prepare(req)
        except RequestError as exc:
            self._send_error(exc.status, str(exc), exc.param)
            return
        try:
            if req.stream:
                self._stream(req, prepared)
            else:
                self._complete(req, prepared)
        except (_ClientGone, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a failure inside generation: one line in the log and to the client
            message = f"generation failed: {type(exc).__name__}: {exc}"
            if self.server.log:
                self.server.log(message)
            self.close_connection = True
            if not req.stream:  # nothing was sent yet
                self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR, message)
            else:  # the stream is open: end it with an error event
                try:
                    self._sse(json.dumps({"error": {"message": message, "type": "server_error"}}))
                except _ClientGone:
                    pass

    # ------------------------------------------------------------------ helpers
    def _drain(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= MAX_BODY_BYTES:
            self.rfile.read(length)
        else:
            self.close_connection = True

    def _read_json(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length <= 0:
            self.close_connection = True
            raise RequestError("a JSON body with a Content-Length is required", HTTPStatus.LENGTH_REQUIRED)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(f"request body of {length} bytes is over the limit of {MAX_BODY_BYTES}",
                               HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise RequestError(f"the body is not valid JSON ({exc.msg} at position {exc.pos})") from None

    def _prepare(self, req: ChatRequest):
        try:
            return self.server.vlm.family.prepare(req.images, req.prompt)
        except ValueError as exc:  # e.g. <image> placeholders that do not match the images given
            raise RequestError(str(exc), param="messages") from None

    def _generate(self, req: ChatRequest, prepared, on_text=None):
        with self.server.lock:
            return self.server.vlm.generate_prepared(
                prepared, max_new_tokens=req.max_tokens, sample=req.sample, temperature=req.temperature or 1.0,
                top_k=req.top_k, top_p=req.top_p, seed=req.seed, on_text=on_text)

    def _envelope(self, kind: str, cid: str, created: int) -> dict:
        return {"id": cid, "object": kind, "created": created, "model": self.server.model_name}

    @staticmethod
    def _usage(res) -> dict:
        return {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.token_ids),
                "total_tokens": res.prompt_tokens + len(res.token_ids)}

    def _complete(self, req: ChatRequest, prepared) -> None:
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        res = self._generate(req, prepared)
        self._send_json(HTTPStatus.OK, {
            **self._envelope("chat.completion", cid, created),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                         "finish_reason": _finish_reason(res)}],
            "usage": self._usage(res),
            "timings": {"prefill_s": res.prefill_s, "decode_s": res.decode_s,
                        "decode_tokens_per_s": res.decode_tokens_per_s if len(res.token_ids) > 1 else None},
        })

    def _stream(self, req: ChatRequest, prepared) -> None:
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's
        self.end_headers()
        self.close_connection = True

        def event(choice_delta: dict, finish: str | None = None, **extra) -> None:
            self._sse(json.dumps({**self._envelope("chat.completion.chunk", cid, created),
                                  "choices": [{"index": 0, "delta": choice_delta, "finish_reason": finish}], **extra}))

        event({"role": "assistant", "content": ""})
        res = self._generate(req, prepared, on_text=lambda piece: event({"content": piece}))
        event({}, _finish_reason(res), usage=self._usage(res))
        self._sse("[DONE]")

    def _sse(self, data: str) -> None:
        """One server-sent event; a client that went away raises _ClientGone (generation stops there)."""
        try:
            self.wfile.write(b"data: " + data.encode() + b"\n\n")
            self.wfile.flush()
        except OSError:
            raise _ClientGone from None


def serve(out_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, accuracy_level: int | None = None,
          max_tokens_limit: int = 1024, quiet: bool = False) -> None:
    """Serve until interrupted (Ctrl-C)."""
    log = None if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    server = make_server(out_dir, host, port, accuracy_level=accuracy_level, max_tokens_limit=max_tokens_limit, log=log)
    if not quiet:
        print(f"serving {out_dir} at {server.url} (POST /v1/chat/completions, GET /v1/models, GET /health; "
              f"accuracy level {server.vlm.accuracy_level}); Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
