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
    (_chat("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "What?"), 400, "not a readable image"),
    (_chat(None, "Hi", max_tokens=33), 400, "max_tokens must be in [1, 32]"),
    (_chat(None, "Hi", temperature="hot"), 400, "temperature must be a number"),
    (_chat(None, "Hi", top_p=0, temperature=1), 400, "top_p must be in"),
    (_chat(None, "Hi", top_k=-1), 400, "top_k must be >= 0"),
    (_chat(None, "Hi", n=2), 400, "n > 1"),
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
