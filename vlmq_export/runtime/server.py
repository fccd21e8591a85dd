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
extension), ``seed``, ``ignore_eos`` (an extension, as vLLM's: generate ``max_tokens`` tokens, ``run --no-stop``),
``stream`` (server-sent ``chat.completion.chunk`` events, then ``data: [DONE]``) and
``stream_options.include_usage`` (a last chunk with ``usage`` and empty ``choices``, as OpenAI sends it).
Images come inline as base64 ``data:`` URLs only: the server fetches nothing. Anything else that changes
the answer (several turns, a system message, ``n`` > 1, tools, penalties) is refused with a 400 and a
one-line message, never ignored. The limits of ``limits.py`` apply as in ``run`` (images per request,
pixels per image, the model's context: a 400 before the vision encoder runs); a wrong method on a known
route gets a 405 with ``Allow``; a connection that sends nothing for ``timeout`` seconds is closed.

Generations run on one thread, batched (``max_batch``, ``serve --max-batch``): a request that arrives while
others decode is prefilled (batch 1) and joins their batch at the next decode step (runtime/generate.py
BatchDecoder); beyond ``max_batch`` running requests it waits its turn; ``max_batch`` 1 runs one generation at a
time. ``/health`` answers meanwhile (with ``running``, ``queued`` and ``largest_batch``, the largest batch a decode
step ran); a completion's ``timings.batch_size`` is the largest batch its own steps ran in. Greedy answers are the
tokens ``vlmq-export run`` gives when alone, and batched too at accuracy level 0; at level 4 ONNX Runtime's INT8
kernels round a batch slightly differently from one row, so a batched answer may part from ``run``'s at a near-tie.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..errors import VlmqError
from .generate import GRAPHS, BatchDecoder, OnnxVLM
from .limits import (DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGES, LimitError, check_image_count, check_prompt,
                     check_range, fit_to_context, generation_ranges)

MAX_BODY_BYTES = 32 << 20  # a request larger than this (inline images included) is refused with 413
DEFAULT_MAX_TOKENS = 64
DEFAULT_TIMEOUT_S = 30.0  # a connection silent this long (before or inside a request) is closed
DEFAULT_MAX_BATCH = 4  # requests decoded together at most
ROUTES = {"/health": "GET", "/v1/models": "GET", "/v1/chat/completions": "POST"}
# body fields that would change the answer and are not implemented: refused when set (non-zero / non-empty)
UNSUPPORTED = ("tools", "functions", "response_format", "logit_bias", "stop", "presence_penalty",
               "frequency_penalty", "logprobs", "top_logprobs")
# control characters (C0, DEL, C1) as \xNN in the log: a request line cannot forge log lines
_LOG_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


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
    include_usage: bool = False  # stream_options.include_usage
    ignore_eos: bool = False  # generate max_tokens tokens whatever they are (run --no-stop)

    @property
    def sample(self) -> bool:
        return self.temperature > 0


def decode_data_url(url: str, where: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """A ``data:image/...;base64,...`` URL as a PIL RGB image, or a RequestError naming ``where`` (an image of
    more than ``max_pixels`` is refused from its header, before it is decoded)."""
    from ..data.loader import open_image

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
        return open_image(io.BytesIO(raw), max_pixels, name=where)
    except VlmqError as exc:
        raise RequestError(str(exc), param=where) from None


def _number(body: dict, key: str, kind, default, lo=None, hi=None):
    """``body[key]`` as ``kind`` (int or float), finite and in [lo, hi] (limits.check_range), else a 400."""
    value = body.get(key)
    if value is None:
        return default
    int_ok = not isinstance(value, float) or value.is_integer()  # NaN and infinities are not integers
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not int_ok):
        raise RequestError(f"{key} must be {'an integer' if kind is int else 'a number'}", param=key)
    try:
        value = kind(value)
    except OverflowError:  # an integer too large for a float
        value = math.inf
    return check_range(key, value, lo, hi, param=key)


def _include_usage(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
    include = opts.get("include_usage", False) if isinstance(opts, dict) else None
    if not isinstance(include, bool) or set(opts) - {"include_usage"}:
        raise RequestError("stream_options takes only include_usage (true or false)", param="stream_options")
    return include


def parse_chat_request(body, max_tokens_limit: int, *, vocab_size: int | None = None,
                       max_images: int = DEFAULT_MAX_IMAGES,
                       max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ChatRequest:
    """The generation a chat-completions request body asks for, or a RequestError / LimitError saying what
    is refused. Images are counted before any is decoded."""
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
    texts, urls = [], []
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
                urls.append((where, url.get("url") if isinstance(url, dict) else url))
            else:
                raise RequestError(f"{where}: expected a text or image_url part", param=where)
    else:
        raise RequestError("messages[0].content must be a string or a list of parts", param="messages")
    prompt = check_prompt("\n".join(texts), param="messages")
    check_image_count(len(urls), max_images, param="messages")
    n = _number(body, "n", int, 1)
    if n != 1:
        raise RequestError("n > 1 is not supported", param="n")
    for key in UNSUPPORTED:
        if body.get(key):
            raise RequestError(f"{key} is not supported", param=key)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stream, ignore_eos = body.get("stream", False), body.get("ignore_eos", False)
    for name, value in (("stream", stream), ("ignore_eos", ignore_eos)):
        if not isinstance(value, bool):
            raise RequestError(f"{name} must be true or false", param=name)
    ranges = generation_ranges(vocab_size, max_tokens_limit)
    req = ChatRequest(
        prompt=prompt, stream=stream, include_usage=_include_usage(body, stream), ignore_eos=ignore_eos,
        max_tokens=_number(body, key, int, min(DEFAULT_MAX_TOKENS, max_tokens_limit), *ranges["max_new_tokens"]),
        temperature=_number(body, "temperature", float, 0.0, *ranges["temperature"]),
        top_p=_number(body, "top_p", float, 1.0, *ranges["top_p"]),
        top_k=_number(body, "top_k", int, 0, *ranges["top_k"]),
        seed=_number(body, "seed", int, None, *ranges["seed"]),
    )
    req.images = [decode_data_url(url, where, max_image_pixels) for where, url in urls]  # the costly part, last
    return req


class _ClientGone(Exception):
    pass


def _finish_reason(res) -> str:
    return "stop" if res.stopped else "length"


class _Job:
    """One request's generation as :class:`Scheduler` runs it; the request's handler thread reads ``events``:
    ("text", piece)... (streaming only), then ("done", GenerationResult) or ("error", exception)."""

    def __init__(self, req: ChatRequest, prepared):
        self.req, self.prepared = req, prepared
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False  # set by the handler when its client went away: the row leaves the batch
        self.batch = 0  # the largest batch its decode steps ran in


class Scheduler:
    """The one thread that runs every generation: up to ``max_batch`` requests decode together in one
    :class:`~vlmq_export.runtime.generate.BatchDecoder`; a request that arrives meanwhile is prefilled and joins at
    the next step, one beyond ``max_batch`` waits (first come, first served)."""

    def __init__(self, vlm: OnnxVLM, max_batch: int = DEFAULT_MAX_BATCH):
        self.vlm, self.max_batch = vlm, int(max_batch)
        self.pending: queue.SimpleQueue = queue.SimpleQueue()
        self.running = 0
        self.largest_batch = 0  # the largest batch a decode step ran
        self.thread = threading.Thread(target=self._loop, name="vlmq-generate", daemon=True)
        self._start = threading.Lock()

    @property
    def busy(self) -> bool:
        return self.running > 0 or not self.pending.empty()

    def submit(self, req: ChatRequest, prepared) -> _Job:
        """Queue a generation (the thread starts with the first, after make_server opened the graphs)."""
        job = _Job(req, prepared)
        self.pending.put(job)
        with self._start:
            if self.thread.ident is None:
                self.thread.start()
        return job

    def close(self) -> None:
        if self.thread.is_alive():
            self.pending.put(None)
            self.thread.join(timeout=60)

    def _loop(self) -> None:
        dec, jobs = BatchDecoder(self.vlm), {}  # jobs: id(row) -> its job
        while True:
            try:
                if not self._turn(dec, jobs):
                    return
            except Exception as exc:  # every running request gets the error; the next batch starts afresh
                for job in jobs.values():
                    job.events.put(("error", exc))
                dec, jobs = BatchDecoder(self.vlm), {}
                self.running = 0

    def _turn(self, dec: BatchDecoder, jobs: dict) -> bool:
        """Admit what is waiting, drop what was cancelled, run one decode step; False when closed."""
        while len(dec.rows) < self.max_batch:  # admit: wait when idle, else take what is waiting
            try:
                job = self.pending.get(block=not dec.rows)
            except queue.Empty:
                break
            if job is None:
                return False
            self._admit(dec, job, jobs)
        for row in [r for r in dec.rows if jobs[id(r)].cancelled]:
            dec.cancel(row)
            jobs.pop(id(row))
        self.running = len(dec.rows)
        if dec.rows:
            batch = list(dec.rows)
            done = dec.step()
            self.largest_batch = max(self.largest_batch, len(batch))
            self.running = len(dec.rows)  # before the answers go: /health then no longer counts them
            for row in batch:
                jobs[id(row)].batch = max(jobs[id(row)].batch, len(batch))
            for row in done:
                job = jobs.pop(id(row))
                row.result.timings["batch_size"] = job.batch
                job.events.put(("done", row.result))
        return True

    @staticmethod
    def _admit(dec: BatchDecoder, job: _Job, jobs: dict) -> None:
        req = job.req
        on_text = (lambda piece: job.events.put(("text", piece))) if req.stream else None
        try:
            row = dec.add(job.prepared, max_new_tokens=req.max_tokens, sample=req.sample,
                          temperature=req.temperature or 1.0, top_k=req.top_k, top_p=req.top_p, seed=req.seed,
                          stop=not req.ignore_eos, on_text=on_text)
        except Exception as exc:
            job.events.put(("error", exc))
            return
        if row.result is None:
            jobs[id(row)] = job
        else:  # done at once (a stop token first, or max_tokens 1)
            row.result.timings["batch_size"] = 1
            job.events.put(("done", row.result))


class VLMServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer over one :class:`OnnxVLM`; generations run on its :class:`Scheduler`, batched up to
    ``max_batch``."""

    daemon_threads = True
    request_queue_size = 128  # connections the listening socket queues (socketserver's default 5 resets a burst)

    def __init__(self, address: tuple[str, int], vlm: OnnxVLM, model_name: str, max_tokens_limit: int = 1024,
                 log=None, *, timeout: float | None = DEFAULT_TIMEOUT_S, max_images: int = DEFAULT_MAX_IMAGES,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_batch: int = DEFAULT_MAX_BATCH):
        try:
            super().__init__(address, _Handler)
        except OSError as exc:
            raise ServeError(f"cannot listen on {address[0]}:{address[1]}: {exc.strerror or exc}") from None
        self.vlm = vlm
        self.model_name = model_name
        self.max_tokens_limit = int(max_tokens_limit)
        self.request_timeout = timeout  # seconds a connection may stay silent (None: forever)
        self.max_images = int(max_images)
        self.max_image_pixels = int(max_image_pixels)
        self.scheduler = Scheduler(vlm, max_batch)
        self.log = log  # callable(str) for one line per request, or None
        self.started = time.time()

    def server_close(self):
        super().server_close()
        if getattr(self, "scheduler", None):  # (socketserver calls this when the bind fails, before __init__ ends)
            self.scheduler.close()

    def handle_error(self, request, client_address):  # one line, not the base class's traceback
        exc = sys.exc_info()[1]
        if self.log:
            self.log(f"{client_address[0]} connection error: {type(exc).__name__}: {exc}".translate(_LOG_ESCAPES))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(out_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, accuracy_level: int | None = None,
                max_tokens_limit: int = 1024, log=None, providers=None, verify: bool = True,
                timeout: float | None = DEFAULT_TIMEOUT_S, max_images: int = DEFAULT_MAX_IMAGES,
                max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, backend: str = "onnxruntime",
                max_batch: int = DEFAULT_MAX_BATCH) -> VLMServer:
    """Bind ``host:port`` (0: any free port) and open every graph of a complete output directory (so a
    broken one fails here, not on the first request; with ``verify``, a graph that does not match its
    sha256 in the manifest too) with ``backend`` (onnxruntime, or tensorrt: OUT's engines, whose profiles'
    batch size caps ``max_batch``). Call ``serve_forever()`` on the result."""
    from ..outdir import check_complete
    from .session import DEFAULT_ACCURACY_LEVEL

    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise VlmqError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    out_dir = Path(out_dir)
    manifest = check_complete(out_dir, verify_hashes=verify)
    level = DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level
    vlm = OnnxVLM(out_dir, accuracy_level=level, providers=providers, backend=backend)  # runners open below
    name = out_dir.resolve().name or manifest.get("source", {}).get("model", "model")
    if backend == "tensorrt":
        max_batch = min(max_batch, _engine_max_batch(out_dir))
    server = VLMServer((host, port), vlm, name, max_tokens_limit, log, timeout=timeout, max_images=max_images,
                       max_image_pixels=max_image_pixels, max_batch=max_batch)  # a busy port fails before the loading
    try:
        for graph in GRAPHS:
            vlm.session(graph)
    except BaseException:
        server.server_close()
        raise
    return server


def _engine_max_batch(out_dir: Path) -> int:
    """The batch size OUT's TensorRT engines were built for (``build --max-batch``; 1 when not recorded)."""
    from ..engines.build import PROFILES

    try:
        return int(json.loads((out_dir / PROFILES).read_text())["limits"]["max_batch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1


class _Handler(BaseHTTPRequestHandler):
    server: VLMServer
    protocol_version = "HTTP/1.1"

    def setup(self):
        self.timeout = self.server.request_timeout  # StreamRequestHandler sets it on the socket
        super().setup()

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        if self.server.log:  # the request line is the client's: control characters escaped
            self.server.log(f"{self.address_string()} {format % args}".translate(_LOG_ESCAPES))

    # ------------------------------------------------------------------ replies
    def _send_json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}}, headers)

    # ------------------------------------------------------------------ routes
    def _route(self) -> str | None:
        """The request's path if ROUTES serves it with this method, else None after a 404 (unknown path)
        or a 405 with ``Allow`` (a known path, another method)."""
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        allowed = ROUTES.get(path)
        if allowed == self.command:
            return path
        self._drain()
        if allowed is None:
            self._send_error(HTTPStatus.NOT_FOUND, f"no route {self.command} {path}")
        else:
            self._send_error(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes {allowed}, not {self.command}",
                             headers={"Allow": allowed})
        return None

    def _refuse(self):  # every other method: a 404 or a 405
        self._route()

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    def do_GET(self):  # noqa: N802 (http.server's naming)
        path = self._route()
        if path == "/health":
            sched = self.server.scheduler
            self._send_json(HTTPStatus.OK, {"status": "ok", "model": self.server.model_name, "busy": sched.busy,
                                            "accuracy_level": self.server.vlm.accuracy_level,
                                            "max_batch": sched.max_batch, "running": sched.running,
                                            "queued": sched.pending.qsize(), "largest_batch": sched.largest_batch})
        elif path == "/v1/models":
            self._send_json(HTTPStatus.OK, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": int(self.server.started),
                 "owned_by": "vlmq-export"}]})

    def do_POST(self):  # noqa: N802
        if self._route() is None:
            return
        srv = self.server
        try:
            req = parse_chat_request(self._read_json(), srv.max_tokens_limit, vocab_size=srv.vlm.vocab_size,
                                     max_images=srv.max_images, max_image_pixels=srv.max_image_pixels)
            prepared = self._prepare(req)
        except (RequestError, LimitError) as exc:
            self._send_error(getattr(exc, "status", HTTPStatus.BAD_REQUEST), str(exc), exc.param)
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
        """Read a body this server will not use, so the connection can carry the next request."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if 0 < length <= MAX_BODY_BYTES and len(self.rfile.read(length)) == length:
            return
        if length != 0:
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
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise RequestError(f"the body did not arrive: nothing for {self.timeout} s",
                               HTTPStatus.REQUEST_TIMEOUT) from None
        if len(raw) < length:
            self.close_connection = True
            raise RequestError(f"the body ended after {len(raw)} of its Content-Length of {length} bytes")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise RequestError(f"the body is not valid JSON ({exc.msg} at position {exc.pos})") from None

    def _prepare(self, req: ChatRequest):
        """The prompt's tokens and pixels; max_tokens clamped to the context they leave (limits.fit_to_context:
        a LimitError, before the vision encoder or the lock, when they fill it)."""
        vlm = self.server.vlm
        try:
            prepared = vlm.family.prepare(req.images, req.prompt)
        except ValueError as exc:  # e.g. <image> placeholders that do not match the images given
            raise RequestError(str(exc), param="messages") from None
        req.max_tokens = fit_to_context(prepared.seq_len, req.max_tokens, vlm.context_length, param="messages")
        return prepared

    def _generate(self, req: ChatRequest, prepared, on_text=None):
        """The request's GenerationResult from the scheduler; ``on_text`` gets each streamed piece (when it raises,
        e.g. the client went away, the generation leaves its batch)."""
        job = self.server.scheduler.submit(req, prepared)
        while True:
            kind, value = job.events.get()
            if kind == "done":
                return value
            if kind == "error":
                raise value
            try:
                on_text(value)
            except BaseException:
                job.cancelled = True
                raise

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
                        "decode_tokens_per_s": res.decode_tokens_per_s if len(res.token_ids) > 1 else None,
                        "batch_size": res.timings.get("batch_size")},
        })

    def _stream(self, req: ChatRequest, prepared) -> None:
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's
        self.end_headers()
        self.close_connection = True

        def chunk(choices: list, **usage) -> None:
            self._sse(json.dumps({**self._envelope("chat.completion.chunk", cid, created), "choices": choices,
                                  **usage}))

        def event(choice_delta: dict, finish: str | None = None, **usage) -> None:
            chunk([{"index": 0, "delta": choice_delta, "finish_reason": finish}], **usage)

        # with stream_options.include_usage, OpenAI's form: "usage": null on every chunk, then one more chunk
        # with the usage and no choices; without, the last chunk carries the usage (an extension)
        null = {"usage": None} if req.include_usage else {}
        event({"role": "assistant", "content": ""}, **null)
        res = self._generate(req, prepared, on_text=lambda piece: event({"content": piece}, **null))
        if req.include_usage:
            event({}, _finish_reason(res), **null)
            chunk([], usage=self._usage(res))
        else:
            event({}, _finish_reason(res), usage=self._usage(res))
        self._sse("[DONE]")

    def _sse(self, data: str) -> None:
        """One server-sent event; a client that went away raises _ClientGone (generation stops there)."""
        try:
            self.wfile.write(b"data: " + data.encode() + b"\n\n")
            self.wfile.flush()
        except OSError:
            raise _ClientGone from None


def serve(out_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, quiet: bool = False, **options) -> None:
    """Serve until interrupted (Ctrl-C); ``options`` are make_server's (accuracy_level, max_tokens_limit, verify,
    timeout, max_images, max_image_pixels, backend, max_batch)."""
    log = None if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    server = make_server(out_dir, host, port, log=log, **options)
    if not quiet:
        print(f"serving {out_dir} at {server.url} (POST /v1/chat/completions, GET /v1/models, GET /health; "
              f"accuracy level {server.vlm.accuracy_level}, max batch {server.scheduler.max_batch}); Ctrl-C stops",
              file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
