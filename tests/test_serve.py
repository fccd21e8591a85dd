"""`vlmq-export serve`: the OpenAI-style HTTP API over an exported tiny model, against `run`'s generation loop."""
from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmq_export import cli
from vlmq_export.runtime.generate import OnnxVLM
from vlmq_export.runtime.server import make_server

FAMILIES = ("smolvlm", "qwen2_vl")


def _png_data_url(seed: int = 0, size: int = 64) -> tuple[str, Image.Image]:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), img


@pytest.fixture(scope="module")
def exported(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    outs = {}
    for fam in FAMILIES:
        out = tmp_path_factory.mktemp("serve") / fam
        assert cli.main([str(tiny_dirs[fam]), "--int4", "--method", "rtn", "--no-validate", "-o", str(out),
                         "--n-calib", "2", "--quiet"]) == 0
        outs[fam] = out
    return outs


@pytest.fixture(scope="module", params=FAMILIES)
def server(request, exported):
    srv = make_server(exported[request.param], port=0, accuracy_level=0, max_tokens_limit=32)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _request(srv, method: str, path: str, body=None, raw: bytes | None = None):
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=120)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data is not None else {})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, resp.getheader("Content-Type"), payload


def _chat(url: str | None, text: str, **kw) -> dict:
    content = [{"type": "text", "text": text}]
    if url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {"messages": [{"role": "user", "content": content}], **kw}


def test_health_and_models(server):
    status, ctype, payload = _request(server, "GET", "/health")
    assert status == 200 and ctype == "application/json"
    health = json.loads(payload)
    assert health["status"] == "ok" and health["busy"] is False and health["accuracy_level"] == 0
    status, _, payload = _request(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(payload)["data"]] == [server.model_name]


def test_greedy_completion_equals_the_generation_loop(server):
    url, img = _png_data_url(1)
    status, _, payload = _request(server, "POST", "/v1/chat/completions",
                                  _chat(url, "Describe the image.", max_tokens=12))
    assert status == 200, payload
    got = json.loads(payload)
    ref = OnnxVLM(server.vlm.out_dir, accuracy_level=0).generate([img], "Describe the image.", max_new_tokens=12)
    assert got["object"] == "chat.completion"
    assert got["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    assert got["choices"][0]["finish_reason"] == ("stop" if ref.stopped else "length")
    assert got["usage"] == {"prompt_tokens": ref.prompt_tokens, "completion_tokens": len(ref.token_ids),
                            "total_tokens": ref.prompt_tokens + len(ref.token_ids)}
    # an image changes the prompt: the same text without it is a shorter prompt
    status, _, payload = _request(server, "POST", "/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "Describe the image."}], "max_tokens": 1})
    assert status == 200 and json.loads(payload)["usage"]["prompt_tokens"] < ref.prompt_tokens


def test_stream_carries_the_same_text_as_the_completion(server):
    url, _ = _png_data_url(2)
    body = _chat(url, "What is this?", max_tokens=10)
    _, _, payload = _request(server, "POST", "/v1/chat/completions", body)
    whole = json.loads(payload)
    status, ctype, payload = _request(server, "POST", "/v1/chat/completions", {**body, "stream": True})
    assert status == 200 and ctype == "text/event-stream"
    events = [line[len("data: "):] for line in payload.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]


def test_seeded_sampling_is_reproducible(server):
    body = _chat(None, "Say something.", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    first = json.loads(_request(server, "POST", "/v1/chat/completions", body)[2])
    again = json.loads(_request(server, "POST", "/v1/chat/completions", body)[2])
    assert first["choices"][0]["message"]["content"] == again["choices"][0]["message"]["content"]


@pytest.mark.parametrize("body, status, words", [
    (None, 400, "not valid JSON"),
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}, 400, "one user message"),
    (_chat("https://example.com/cat.png", "What?"), 400, "fetches nothing"),
    (_chat("data:image/png;base64,@@@", "What?"), 400, "invalid base64"),
    (_chat("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "What?"), 400, "unreadable image"),
    (_chat(None, "Hi", max_tokens=33), 400, "max_tokens must be in [1, 32]"),
    (_chat(None, "Hi", temperature="hot"), 400, "temperature must be a number"),
    (_chat(None, "Hi", top_p=0, temperature=1), 400, "top_p must be in"),
    (_chat(None, "Hi", top_k=-1), 400, "top_k must be in [0, "),
    (_chat(None, "Hi", top_k=1e9, temperature=1), 400, "top_k must be in [0, "),
    (_chat(None, "Hi", seed=-1, temperature=1), 400, "seed must be in [0, "),
    (_chat(None, "Hi", seed=10**30, temperature=1), 400, "seed must be in [0, "),
    (_chat(None, "Hi", temperature=float("nan")), 400, "temperature must be a finite number"),
    (_chat(None, "Hi", top_p=float("nan"), temperature=1), 400, "top_p must be a finite number"),
    (_chat(None, "Hi", max_tokens=float("inf")), 400, "max_tokens must be an integer"),
    (_chat(None, "Hi", temperature=10**400), 400, "temperature must be a finite number"),
    (_chat(None, "   "), 400, "the prompt is empty"),
    (_chat(None, "Hi", presence_penalty=0.5), 400, "presence_penalty is not supported"),
    (_chat(None, "Hi", stream_options={"include_usage": True}), 400, "only allowed with stream: true"),
    (_chat(None, "Hi", stream=True, stream_options={"include_usage": 1}), 400, "stream_options takes only"),
    (_chat(None, "Hi", stream=True, stream_options={"continuous_usage_stats": True}), 400, "stream_options takes only"),
    (_chat(None, "Hi", n=2), 400, "n > 1"),
    (_chat(None, "Hi", ignore_eos="yes"), 400, "ignore_eos must be true or false"),
    (_chat(None, "Hi", tools=[{"type": "function"}]), 400, "tools is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "text or image_url part"),
])
def test_bad_requests_get_a_clear_error(server, body, status, words):
    got_status, ctype, payload = _request(server, "POST", "/v1/chat/completions", body,
                                          raw=b"{not json" if body is None else None)
    assert got_status == status and ctype == "application/json"
    err = json.loads(payload)["error"]
    assert words in err["message"] and "\n" not in err["message"]


def test_placeholder_mismatch_and_unknown_route(server, exported):
    if server.vlm.family.name == "smolvlm":  # an explicit <image> placeholder without an image
        status, _, payload = _request(server, "POST", "/v1/chat/completions", _chat(None, "<image> What?"))
        assert status == 400 and "placeholder" in json.loads(payload)["error"]["message"]
    status, _, payload = _request(server, "POST", "/v1/completions", {"prompt": "Hi"})
    assert status == 404 and "no route" in json.loads(payload)["error"]["message"]
    assert _request(server, "GET", "/nope")[0] == 404
    # the server still answers after every refusal
    assert _request(server, "GET", "/health")[0] == 200


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmq_export.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_refuses_a_directory_that_is_not_an_export(tmp_path):
    res = _cli("serve", str(tmp_path), "--port", "0")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "not a vlmq-export output" in res.stderr


def test_cli_reports_a_busy_port_in_one_line(exported):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        res = _cli("serve", str(exported["smolvlm"]), "--port", str(port), "--quiet")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in res.stderr


def test_bench_serve_tool_writes_its_comparison(exported, tmp_path, monkeypatch):
    from conftest import load_tool

    out = tmp_path / "serve.json"
    monkeypatch.setattr(sys, "argv", ["bench_serve.py", str(exported["smolvlm"]), "--repeats", "1",
                                      "--max-tokens", "4", "--out", str(out)])
    assert load_tool("bench_serve").main() == 0  # exits non-zero when the variants' answers differ
    res = json.loads(out.read_text())
    assert set(res["median_s"]) == {"direct", "http", "http_stream"} and res["ratio_to_direct"]["direct"] == 1.0
    assert 1 <= res["answer_tokens"] <= 4
    from vlmq_export.data.shapes import make_split
    from vlmq_export.models import load_family

    test = make_split("test", 1)[0]  # the tool's default request: this scene and its question
    family = load_family(exported["smolvlm"] / "processor")
    assert res["prompt_tokens"] == family.prepare(test.images, test.prompt).seq_len


def _events(payload: bytes) -> list:
    events = [line[len("data: "):] for line in payload.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_stream_include_usage_ends_with_a_usage_chunk(server):
    body = _chat(None, "Count to three.", max_tokens=6)
    whole = json.loads(_request(server, "POST", "/v1/chat/completions", body)[2])
    status, _, payload = _request(server, "POST", "/v1/chat/completions",
                                  {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    chunks = _events(payload)
    *deltas, last = chunks
    assert last["choices"] == [] and last["usage"] == whole["usage"]  # OpenAI's form
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in deltas)
    assert deltas[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in deltas)
    assert text == whole["choices"][0]["message"]["content"]


def _png_bytes_url(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("1", size).save(buf, format="PNG")  # 1-bit, blank: a few KB even at 400 megapixels
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("size, words", [
    ((5000, 5000), "5000x5000 = 25000000 pixels is over the limit of 16777216"),
    ((10_000, 10_000), "decompression bomb"),  # Pillow's DecompressionBombWarning
    ((20_000, 20_000), "decompression bomb"),  # Pillow's DecompressionBombError (closed the connection before)
])
def test_oversized_images_and_decompression_bombs_get_a_400(server, size, words):
    status, _, payload = _request(server, "POST", "/v1/chat/completions", _chat(_png_bytes_url(size), "What?"))
    assert status == 400 and words in json.loads(payload)["error"]["message"]
    assert _request(server, "GET", "/health")[0] == 200


def test_image_count_and_context_limits(server):
    url, _ = _png_data_url(3, size=16)
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 9
                          + [{"type": "text", "text": "What?"}]}]}
    status, _, payload = _request(server, "POST", "/v1/chat/completions", body)
    assert status == 400 and "9 images, more than the limit of 8" in json.loads(payload)["error"]["message"]
    ctx = server.vlm.context_length
    status, _, payload = _request(server, "POST", "/v1/chat/completions", _chat(None, "a " * ctx, max_tokens=1))
    err = json.loads(payload)["error"]
    assert status == 400 and f"the model's context is {ctx}" in err["message"] and err["param"] == "messages"


def _raw_exchange(srv, data: bytes, shut: bool = True, timeout: float = 10) -> bytes:
    """Send raw bytes, optionally half-close, and read until the server closes the connection."""
    with socket.create_connection(srv.server_address[:2], timeout=timeout) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    return got


def test_a_body_shorter_than_its_content_length_is_refused(server):
    body = json.dumps(_chat(None, "Hi", max_tokens=1)).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) + 10}\r\n\r\n").encode()
    got = _raw_exchange(server, head + body)
    assert got.startswith(b"HTTP/1.1 400 ") and b"the body ended after" in got


def test_wrong_method_on_a_known_route_is_405_with_allow(server):
    host, port = server.server_address[:2]
    for method, path, allow in (("POST", "/health", "GET"), ("GET", "/v1/chat/completions", "POST"),
                                ("PUT", "/v1/models", "GET"), ("DELETE", "/v1/chat/completions", "POST")):
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request(method, path, body=b"{}" if method in ("POST", "PUT") else None)
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        assert resp.status == 405 and resp.getheader("Allow") == allow, (method, path, payload)
        assert f"{path} takes {allow}" in json.loads(payload)["error"]["message"]
    assert _request(server, "PUT", "/nope", {})[0] == 404


@pytest.fixture(scope="module")
def quick_server(exported):
    """A server with a short connection timeout that records its log lines."""
    lines: list[str] = []
    srv = make_server(exported["smolvlm"], port=0, accuracy_level=0, max_tokens_limit=4, timeout=0.5,
                      log=lines.append)
    srv.lines = lines
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_silent_and_half_sent_connections_time_out(quick_server):
    silent = socket.create_connection(quick_server.server_address[:2], timeout=10)
    half = socket.create_connection(quick_server.server_address[:2], timeout=10)
    try:
        half.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: the headers never end
        assert _request(quick_server, "GET", "/health")[0] == 200  # others are served meanwhile
        for sock in (silent, half):
            assert sock.recv(1024) == b""  # closed by the server (before: the client timed out here)
    finally:
        silent.close()
        half.close()
    assert _request(quick_server, "GET", "/health")[0] == 200


def test_control_characters_of_the_request_line_are_escaped_in_the_log(quick_server):
    _raw_exchange(quick_server, b"GET /health\x1b[2J\rFAKE 200 OK HTTP/1.1\r\nHost: x\r\n\r\n")
    logged = [line for line in quick_server.lines if "FAKE" in line]
    assert logged and all(not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in line) for line in logged)
    assert any("\\x1b[2J\\x0dFAKE" in line for line in logged)


def test_a_body_that_stops_arriving_gets_a_408(quick_server):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    got = _raw_exchange(quick_server, head + b'{"messages"', shut=False)  # then silence, the socket left open
    assert got.startswith(b"HTTP/1.1 408 ") and b"the body did not arrive" in got
    assert _request(quick_server, "GET", "/health")[0] == 200


def _text_of(payload: bytes) -> tuple[str, dict | None]:
    """(the answer's text, its timings) of a completion or of a stream."""
    if payload.startswith(b"data: "):
        chunks = _events(payload)
        return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]), None
    got = json.loads(payload)
    return got["choices"][0]["message"]["content"], got["timings"]


def _concurrently(srv, bodies: list, monkeypatch) -> list[bytes]:
    """POST ``bodies`` at once: the scheduler's first prefill is held until every other request is queued, so the
    batch they run in does not depend on thread timing."""
    gate, prefill_inputs = threading.Event(), srv.vlm.prefill_inputs  # every prefill starts there (OnnxVLM.prefill)
    monkeypatch.setattr(srv.vlm, "prefill_inputs", lambda prepared: (gate.wait(60), prefill_inputs(prepared))[1])
    results: list = [None] * len(bodies)

    def post(i):
        results[i] = _request(srv, "POST", "/v1/chat/completions", bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for _ in range(600):  # the first request is held in its prefill, the others wait in the queue
        health = json.loads(_request(srv, "GET", "/health")[2])
        if health["queued"] == len(bodies) - 1:
            break
        threading.Event().wait(0.05)
    assert health["busy"] and health["queued"] == len(bodies) - 1
    gate.set()
    for t in threads:
        t.join(120)
    monkeypatch.undo()
    assert all(r[0] == 200 for r in results), results
    return [r[2] for r in results]


def _batch_bodies() -> list[dict]:
    url, _ = _png_data_url(3)
    return [_chat(None, "hi", max_tokens=12), _chat(url, "What is in this picture?", max_tokens=8),
            _chat(None, "Tell me a long story about robots " * 3, max_tokens=12, stream=True),
            _chat(url, "Describe it.", max_tokens=12)]


def test_concurrent_requests_are_batched_with_the_sequential_answers(server, monkeypatch):
    bodies = _batch_bodies()
    sequential = [_text_of(_request(server, "POST", "/v1/chat/completions", b)[2]) for b in bodies]
    assert all(t["batch_size"] == 1 for _, t in sequential if t)
    health = json.loads(_request(server, "GET", "/health")[2])
    assert health["max_batch"] == 4 and health["largest_batch"] == 1 and not health["busy"]
    together = [_text_of(p) for p in _concurrently(server, bodies, monkeypatch)]
    assert [text for text, _ in together] == [text for text, _ in sequential]
    assert all(t["batch_size"] == 4 for _, t in together if t)  # each ran its first step with the other three
    health = json.loads(_request(server, "GET", "/health")[2])
    assert health["largest_batch"] == 4 and health["running"] == 0 and not health["busy"]


def test_max_batch_1_runs_one_generation_at_a_time(exported, monkeypatch):
    srv = make_server(exported["smolvlm"], port=0, accuracy_level=0, max_tokens_limit=32, max_batch=1)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        bodies = _batch_bodies()
        sequential = [_text_of(_request(srv, "POST", "/v1/chat/completions", b)[2])[0] for b in bodies]
        together = [_text_of(p) for p in _concurrently(srv, bodies, monkeypatch)]
        assert [text for text, _ in together] == sequential
        assert all(t["batch_size"] == 1 for _, t in together if t)
        assert json.loads(_request(srv, "GET", "/health")[2])["largest_batch"] == 1
    finally:
        srv.shutdown()
        srv.server_close()


def test_cli_refuses_a_max_batch_below_1(exported):
    res = _cli("serve", str(exported["smolvlm"]), "--port", "0", "--max-batch", "0")
    assert res.returncode == 2 and res.stderr.splitlines()[-1].endswith("error: --max-batch must be at least 1")


def test_bench_serve_tool_measures_batching(exported, tmp_path, monkeypatch):
    from conftest import load_tool

    out = tmp_path / "serve-batch.json"
    monkeypatch.setattr(sys, "argv", ["bench_serve.py", str(exported["smolvlm"]), "--batch", "--text-only",
                                      "--concurrency", "1", "3", "--max-batch", "3", "--repeats", "1",
                                      "--max-tokens", "4", "--accuracy-level", "0", "--out", str(out)])
    assert load_tool("bench_serve").main() == 0  # exits non-zero when max_batch 1 and 3 answer differently
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"max_batch=1", "max_batch=3"} and set(res["throughput_ratio"]) == {"1", "3"}
    assert res["answers_differing_from_max_batch_1"] == {"max_batch=1": 0, "max_batch=3": 0}
    for by_n in res["results"].values():
        assert set(by_n) == {"1", "3"}
        assert by_n["3"]["tokens_per_s"] > 0 and by_n["3"]["tokens_per_round"] == 12  # ignore_eos: 3 x 4 tokens
        assert by_n["3"]["latency_p90_s"] >= by_n["3"]["latency_median_s"] > 0


def test_a_failed_decode_step_answers_500_and_the_next_batch_runs(quick_server, monkeypatch):
    from vlmq_export.runtime.generate import BatchDecoder

    step = BatchDecoder.step

    def broken(self):
        monkeypatch.setattr(BatchDecoder, "step", step)  # fails once
        raise RuntimeError("boom")

    monkeypatch.setattr(BatchDecoder, "step", broken)
    body = _chat(None, "hi", max_tokens=4)
    status, _, payload = _request(quick_server, "POST", "/v1/chat/completions", body)
    assert status == 500 and "generation failed: RuntimeError: boom" in json.loads(payload)["error"]["message"]
    status, _, payload = _request(quick_server, "POST", "/v1/chat/completions", body)
    assert status == 200 and json.loads(payload)["choices"][0]["message"]["content"] is not None
    health = json.loads(_request(quick_server, "GET", "/health")[2])
    assert health["running"] == 0 and not health["busy"]


def test_many_simultaneous_connections_are_accepted(quick_server):
    """A burst of clients (what a batching server is for) is queued by the listening socket, not reset."""
    addr = quick_server.server_address[:2]
    socks = [socket.create_connection(addr, timeout=30) for _ in range(48)]  # all connected before any is served
    try:
        for s in socks:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for s in socks:
            assert s.recv(64).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in socks:
            s.close()


def test_ignore_eos_generates_max_tokens(server, monkeypatch):
    body = _chat(None, "Say something.", max_tokens=6)
    first = json.loads(_request(server, "POST", "/v1/chat/completions", body)[2])
    tokens = server.vlm.generate([], "Say something.", max_new_tokens=6).token_ids  # (the server is idle)
    # the answer's first token made a stop token: the plain request now stops at once, ignore_eos does not
    monkeypatch.setattr(type(server.vlm.family), "stop_token_ids", property(lambda self: [tokens[0]]))
    stopped = json.loads(_request(server, "POST", "/v1/chat/completions", body)[2])
    assert stopped["usage"]["completion_tokens"] == 0 and stopped["choices"][0]["finish_reason"] == "stop"
    got = json.loads(_request(server, "POST", "/v1/chat/completions", {**body, "ignore_eos": True})[2])
    assert got["usage"]["completion_tokens"] == 6 and got["choices"][0]["finish_reason"] == "length"
    assert got["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
