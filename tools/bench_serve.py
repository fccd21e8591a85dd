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

    python tools/bench_serve.py [OUT] --batch [--concurrency 1 4 16] [--max-batch 4] [--out benchmarks/serve-batch.json]

``--batch``: serving throughput under load instead: N clients send one greedy request each at the same moment
(distinct prompts: the question plus "(request i)"; ``ignore_eos``, so each answer is ``--max-tokens`` long and both
settings generate the same tokens), for each N of ``--concurrency``, with the server's max_batch 1
(one generation at a time) and ``--max-batch`` (requests decoded together), interleaved (the order rotates every
repeat). Each round's generated tokens / its wall time is its throughput; the JSON keeps the median throughput and
the median and 90th-percentile request latency per (max_batch, N), the throughput ratio, and how many answers differ
from max_batch 1's (``--accuracy-level 0``: none may, it is checked; at level 4 ONNX Runtime's INT8 kernels round
one row and several rows differently, so a near-tie can go the other way).
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


def _post(srv, body: dict) -> tuple[str, float, int]:
    """(answer, wall seconds, completion tokens) of one chat request."""
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
        events = [json.loads(e) for e in events[:-1]]  # the last is [DONE]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        usage = events[-1]["usage"]
    else:
        got = json.loads(payload)
        text, usage = got["choices"][0]["message"]["content"], got["usage"]
    return text, seconds, usage["completion_tokens"]


def _round(srv, bodies: list[dict]) -> dict:
    """Every body POSTed at once, one client thread each: answers, latencies, tokens and the round's wall time."""
    results: list = [None] * len(bodies)

    def post(i):
        try:
            results[i] = _post(srv, bodies[i])
        except Exception as exc:  # noqa: BLE001 (reported below, in the main thread)
            results[i] = exc

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise SystemExit(f"a request failed: {failed[0]}")
    return {"answers": [r[0] for r in results], "latency_s": [r[1] for r in results],
            "tokens": sum(r[2] for r in results), "wall_s": wall}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def batch_bench(srv, body: dict, concurrency: list[int], max_batch: int, repeats: int, exact: bool) -> dict:
    """Throughput and latency of ``concurrency`` simultaneous requests at max_batch 1 and ``max_batch``."""
    settings = [1, max_batch]
    prompt = body["messages"][0]["content"][-1]["text"]

    def bodies(n):
        out = []
        for i in range(n):
            content = [*body["messages"][0]["content"][:-1], {"type": "text", "text": f"{prompt} (request {i})"}]
            out.append({**body, "messages": [{"role": "user", "content": content}], "ignore_eos": True})
        return out

    rounds: dict[tuple[int, int], list[dict]] = {(mb, n): [] for mb in settings for n in concurrency}
    for r in range(-1, repeats):  # r = -1: the warm-up round, not kept
        for n in concurrency:
            for mb in settings[r % 2:] + settings[:r % 2]:
                srv.scheduler.max_batch = mb
                res = _round(srv, bodies(n))
                if r >= 0:
                    rounds[(mb, n)].append(res)
    results, ratio, differ = {}, {}, {}
    for n in concurrency:
        for mb in settings:
            runs = rounds[(mb, n)]
            alone = rounds[(1, n)][0]["answers"]
            differ[f"max_batch={mb}"] = differ.get(f"max_batch={mb}", 0) + sum(
                a != b for run in runs for a, b in zip(run["answers"], alone))
            lat = [x for run in runs for x in run["latency_s"]]
            results.setdefault(f"max_batch={mb}", {})[str(n)] = {
                "tokens_per_s": statistics.median(run["tokens"] / run["wall_s"] for run in runs),
                "latency_median_s": statistics.median(lat), "latency_p90_s": _percentile(lat, 0.9),
                "tokens_per_round": runs[0]["tokens"], "rounds_wall_s": [run["wall_s"] for run in runs]}
        ratio[str(n)] = (results[f"max_batch={max_batch}"][str(n)]["tokens_per_s"]
                         / results["max_batch=1"][str(n)]["tokens_per_s"])
    if exact and any(differ.values()):
        raise SystemExit(f"answers differ from max_batch 1's at accuracy level 0: {differ}")
    return {"results": results, "throughput_ratio": ratio, "answers_differing_from_max_batch_1": differ}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output_dir", nargs="?", help="a vlmq-export output directory (default: a tiny random SmolVLM)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--image", help="image file (default: a ShapesVQA scene)")
    ap.add_argument("--prompt", help="question (default: a ShapesVQA test question, or a generic one with --image)")
    ap.add_argument("--text-only", action="store_true", help="send no image (a decode-heavy request with a long answer)")
    ap.add_argument("--batch", action="store_true", help="throughput under concurrent requests (see above)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-batch", type=int, default=None, help="the batched setting (default: serve's default)")
    ap.add_argument("--accuracy-level", type=int, default=None, help="ONNX Runtime's (default: serve's, 4)")
    ap.add_argument("--out", default=None, help="default benchmarks/serve.json (--batch: benchmarks/serve-batch.json)")
    args = ap.parse_args()
    args.out = args.out or ("benchmarks/serve-batch.json" if args.batch else "benchmarks/serve.json")
    from PIL import Image

    from vlmq_export import cli
    from vlmq_export.runtime.server import DEFAULT_MAX_BATCH, make_server

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

        srv = make_server(out_dir, port=0, max_tokens_limit=max(args.max_tokens, 1), accuracy_level=args.accuracy_level)
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        vlm = srv.vlm
        if args.batch:
            max_batch = args.max_batch or DEFAULT_MAX_BATCH
            bench = batch_bench(srv, body, args.concurrency, max_batch, args.repeats, vlm.accuracy_level == 0)
            srv.shutdown()
            srv.server_close()
            manifest = json.loads((out_dir / "manifest.json").read_text())
            return _write(args, {
                "output_dir": args.output_dir or "builtin:tiny-smolvlm (rtn)", "model": manifest["source"]["model"],
                "method": manifest["recipe"]["method"], "llm_flavour": vlm.llm_flavour, "images": len(images),
                "prompt": prompt, "accuracy_level": vlm.accuracy_level, "repeats": args.repeats,
                "max_tokens": args.max_tokens, "max_batch": max_batch, "concurrency": args.concurrency, **bench},
                ("throughput_ratio", "answers_differing_from_max_batch_1"))

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
    return _write(args, {
        "output_dir": args.output_dir or "builtin:tiny-smolvlm (rtn)",
        "images": len(images), "prompt": prompt,
        "accuracy_level": vlm.accuracy_level, "repeats": args.repeats, "max_tokens": args.max_tokens,
        "prompt_tokens": prompt_tokens, "answer": texts["direct"], "answer_tokens": new_tokens[0],
        "median_s": med, "ratio_to_direct": {name: med[name] / med["direct"] for name in med},
        "runs_s": times,
    }, ("median_s", "ratio_to_direct", "answer"))


def _write(args, fields: dict, summary: tuple) -> int:
    """``fields`` with the commit and machine stamp into ``args.out``; ``summary``'s keys printed."""
    from vlmq_export.testing.machine import machine_stamp

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    result = {"commit": commit, "machine": machine_stamp(), **fields}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
