#!/usr/bin/env python
"""What serving over HTTP costs: one greedy chat request through ``vlmq-export serve``'s server (plain and
streamed) against the same generation called directly (``OnnxVLM.generate_prepared``), side by side.

    python tools/bench_serve.py [OUT] [--repeats 7] [--max-tokens 32] [--image IMG] [--out benchmarks/serve.json]

OUT: an output directory (e.g. ``out/quickstart`` from ``scripts/quickstart.sh``); without it a tiny
random SmolVLM is exported to a temporary folder (its timings are the server's fixed costs, nothing more).
The request carries one image as a base64 data: URL and a question (``--image`` / ``--prompt``,
default a held-out ShapesVQA test scene and its question); every variant must give the same text, which is checked. The variants run interleaved (the
order rotates every repeat) after one warm-up each; the JSON keeps each one's median wall time per
request and the ratio to the direct call.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _post(srv, body: dict) -> tuple[str, float]:
    host, port = srv.server_address[:2]
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read().decode()
    conn.close()
    seconds = time.perf_counter() - t0
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {payload[:200]}")
    if body.get("stream"):
        events = [e[len("data: "):] for e in payload.split("\n\n") if e.startswith("data: ")]
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    else:
        text = json.loads(payload)["choices"][0]["message"]["content"]
    return text, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output_dir", nargs="?", help="a vlmq-export output directory (default: a tiny random SmolVLM)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--image", help="image file (default: a ShapesVQA scene)")
    ap.add_argument("--prompt", help="question (default: a ShapesVQA test question, or a generic one with --image)")
    ap.add_argument("--text-only", action="store_true", help="send no image (a decode-heavy request with a long answer)")
    ap.add_argument("--out", default="benchmarks/serve.json")
    args = ap.parse_args()
    from PIL import Image

    from vlmq_export import cli
    from vlmq_export.runtime.server import make_server
    from vlmq_export.testing.machine import machine_stamp

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.output_dir) if args.output_dir else Path(tmp) / "tiny"
        if not args.output_dir:
            rc = cli.main(["builtin:tiny-smolvlm", "--int4", "--method", "rtn", "--no-validate", "-o", str(out_dir),
                           "--quiet"])
            if rc:
                return rc
        if args.image:
            image, prompt = Image.open(args.image).convert("RGB"), args.prompt or "What is in the picture?"
        else:  # a held-out ShapesVQA test question with its scene
            from vlmq_export.data.shapes import make_split
            test = make_split("test", 1)[0]
            image, prompt = test.images[0], args.prompt or test.prompt
        images = [] if args.text_only else [image]
        if args.text_only:
            prompt = args.prompt or "Tell me a story about a robot who paints."
        content = [{"type": "text", "text": prompt}]
        for img in images:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            content.insert(0, {"type": "image_url",
                               "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}})
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": args.max_tokens}

        srv = make_server(out_dir, port=0, max_tokens_limit=max(args.max_tokens, 1))
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        vlm = srv.vlm

        new_tokens = []

        def direct():
            t0 = time.perf_counter()
            res = vlm.generate_prepared(vlm.family.prepare(images, prompt), max_new_tokens=args.max_tokens)
            new_tokens.append(len(res.token_ids))
            return res.text, time.perf_counter() - t0

        variants = {"direct": direct, "http": lambda: _post(srv, body),
                    "http_stream": lambda: _post(srv, {**body, "stream": True})}
        texts = {name: fn()[0] for name, fn in variants.items()}  # warm-up, and every variant's answer
        if len(set(texts.values())) != 1:
            raise SystemExit(f"variants disagree: {texts}")
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(variants[name]()[1])
        srv.shutdown()
        srv.server_close()
        prompt_tokens = vlm.family.prepare(images, prompt).seq_len
    med = {name: statistics.median(t) for name, t in times.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    result = {
        "commit": commit, "machine": machine_stamp(), "output_dir": args.output_dir or "builtin:tiny-smolvlm (rtn)",
        "images": len(images), "prompt": prompt,
        "accuracy_level": vlm.accuracy_level, "repeats": args.repeats, "max_tokens": args.max_tokens,
        "prompt_tokens": prompt_tokens, "answer": texts["direct"], "answer_tokens": new_tokens[0],
        "median_s": med, "ratio_to_direct": {name: med[name] / med["direct"] for name in med},
        "runs_s": times,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_s", "ratio_to_direct", "answer")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
