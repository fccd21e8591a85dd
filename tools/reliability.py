#!/usr/bin/env python
"""Reliability figures for the README: bad inputs, kills, a loaded server. Black-box, through the CLI and HTTP.

    python tools/reliability.py [--model builtin:tiny-qwen2-vl] [--requests 200] [--concurrency 16]
                                [--out benchmarks/reliability.json]

1. **Bad inputs**: every case is a command line (or an edited output directory) a user could get wrong. A case
   holds when the command exits non-zero, prints no traceback and no "internal error", and its last stderr line
   says what is wrong (argparse's usage line may stand before it).
2. **Kills**: an export is killed (SIGKILL) once it reaches a stage (calibrate, qdq, validate); the output
   directory must not exist or must not pass `check_complete`, and a rerun with the same arguments must finish
   (resuming the calibration where a checkpoint exists) and pass it.
3. **Load**: `serve` on the export; N chat requests, C at a time (greedy, short answers, half with an image),
   interleaved with bad requests (which must get a 4xx); counts, error kinds, latency percentiles.

Everything runs on this machine against 127.0.0.1 only, bounded in count and time.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CLI = [sys.executable, "-m", "vlmq_export.cli"]


def cli(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout)


def holds(proc: subprocess.CompletedProcess) -> tuple[bool, str]:
    # progress lines ("[  1.2s] stage: ...") may come first; argparse puts its usage line before its error
    err = [l for l in proc.stderr.strip().splitlines() if not l.startswith("[")]
    last = err[-1] if err else ""
    ok = (proc.returncode != 0 and "Traceback" not in proc.stderr and "internal error" not in proc.stderr
          and "error" in last.lower()
          and (len(err) == 1 or (err[0].startswith("usage:") and all(l.startswith(" ") for l in err[1:-1]))))
    return ok, last


def bad_input_cases(out: Path, model: str, tmp: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) pairs; files they need are made under ``tmp``."""
    (tmp / "afile").write_text("x")
    (tmp / "foreign").mkdir(exist_ok=True)
    (tmp / "foreign" / "notes.txt").write_text("mine")
    (tmp / "empty_model").mkdir(exist_ok=True)
    (tmp / "bad.jsonl").write_text("{not json\n")
    (tmp / "noimg.jsonl").write_text(json.dumps({"image": "missing.png", "prompt": "hi"}) + "\n")
    (tmp / "notimage.png").write_text("not a png")
    (tmp / "truncated_model").mkdir(exist_ok=True)
    src = Path(cli_resolve(model))
    for f in src.iterdir():
        if f.is_file():
            data = f.read_bytes()
            (tmp / "truncated_model" / f.name).write_bytes(data[: len(data) // 3] if f.suffix == ".safetensors" else data)
    o = ["-o", str(tmp / "never")]
    return [
        ("export: unknown model path", ["./no/such/model", "--int4", *o]),
        ("export: directory without config.json", [str(tmp / "empty_model"), *o]),
        ("export: unknown builtin", ["builtin:nope", *o]),
        ("export: truncated safetensors", [str(tmp / "truncated_model"), "--method", "rtn", *o]),
        ("export: --group-size 0", [model, "--group-size", "0", *o]),
        ("export: --group-size 100", [model, "--group-size", "100", *o]),
        ("export: --damp -1", [model, "--damp", "-1", *o]),
        ("export: --n-calib 0", [model, "--n-calib", "0", *o]),
        ("export: unknown method", [model, "--method", "awq", *o]),
        ("export: unknown component", [model, "--components", "decoder", *o]),
        ("export: bad component recipe", [model, "--vision", "w5x", *o]),
        ("export: --int8 (not available)", [model, "--int8", *o]),
        ("export: --device cuda without CUDA", [model, "--device", "cuda", *o]),
        ("export: --device tpu", [model, "--device", "tpu", *o]),
        ("export: -o under a file", [model, "-o", str(tmp / "afile" / "out")]),
        ("export: -o a foreign directory", [model, "-o", str(tmp / "foreign")]),
        ("export: -o in /proc", [model, "-o", "/proc/vlmq-out"]),
        ("export: calib JSONL malformed", [model, "--calib", str(tmp / "bad.jsonl"), *o]),
        ("export: calib image missing", [model, "--calib", str(tmp / "noimg.jsonl"), *o]),
        ("export: calib path missing", [model, "--calib", str(tmp / "nope.jsonl"), *o]),
        ("export: --saliency-floor -1", [model, "--saliency-floor", "-1", *o]),
        ("export: --gptaq-alpha 2", [model, "--method", "gptaq", "--gptaq-alpha", "2", *o]),
        ("run: missing directory", ["run", str(tmp / "nothere"), "--prompt", "hi"]),
        ("run: not an output directory", ["run", str(tmp / "foreign"), "--prompt", "hi"]),
        ("run: empty prompt", ["run", str(out), "--prompt", ""]),
        ("run: negative --max-new-tokens", ["run", str(out), "--prompt", "hi", "--max-new-tokens", "-1"]),
        ("run: missing image", ["run", str(out), "--image", str(tmp / "none.png"), "--prompt", "hi"]),
        ("run: not an image", ["run", str(out), "--image", str(tmp / "notimage.png"), "--prompt", "hi"]),
        ("run: prompt beyond the context", ["run", str(out), "--prompt", "word " * 20000]),
        ("validate: missing directory", ["validate", str(tmp / "nothere")]),
        ("lint: missing directory", ["lint", str(tmp / "nothere")]),
        ("lint: unknown target", ["lint", str(out), "--target", "tpu"]),
        ("inspect: not an output directory", ["inspect", str(tmp / "foreign")]),
        ("eval: missing directory", ["eval", str(tmp / "nothere")]),
        ("serve: bad port", ["serve", str(out), "--port", "70000"]),
        ("serve: missing directory", ["serve", str(tmp / "nothere"), "--port", "0"]),
    ]


def cli_resolve(model: str) -> str:
    from vlmq_export.sources import resolve_model

    return str(resolve_model(model))


def tampered_cases(out: Path, tmp: Path) -> list[tuple[str, list[str]]]:
    """Copies of ``out`` broken after the fact: a flipped byte in a graph, a deleted graph, an unfinished status."""
    import shutil

    cases = []
    flip = tmp / "flipped"
    shutil.copytree(out, flip)
    data = bytearray((flip / "llm.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (flip / "llm.onnx").write_bytes(bytes(data))
    gone = tmp / "gone"
    shutil.copytree(out, gone)
    (gone / "projector.onnx").unlink()
    partial = tmp / "partial"
    shutil.copytree(out, partial)
    m = json.loads((partial / "manifest.json").read_text())
    m["status"] = "calibrating"
    (partial / "manifest.json").write_text(json.dumps(m))
    for name, d in (("flipped byte in llm.onnx", flip), ("deleted projector.onnx", gone), ("status not complete", partial)):
        for verb in (["run", str(d), "--prompt", "hi"], ["lint", str(d)], ["validate", str(d)], ["eval", str(d)]):
            cases.append((f"{verb[0]}: {name}", verb))
    return cases


def kill_at(model: str, out: Path, stage: str, timeout: float = 600) -> dict:
    from vlmq_export.errors import VlmqError
    from vlmq_export.outdir import check_complete

    args = CLI + [model, "--method", "gptq", "-o", str(out)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    killed = False
    t0 = time.time()
    for line in proc.stderr:
        if f"{stage}:" in line:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        if time.time() - t0 > timeout:
            break
    proc.wait()
    try:
        check_complete(out)
        left_complete = True
    except VlmqError:
        left_complete = False
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    try:
        check_complete(out)
        finished = rerun.returncode == 0
    except VlmqError:
        finished = False
    return {"stage": stage, "killed": killed, "left_a_complete_looking_dir": left_complete,
            "rerun_ok": finished, "rerun_resumed": "resum" in rerun.stderr,
            "leftovers": sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, timeout: float = 120) -> tuple[int, float]:
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            code = r.status
    except urllib.error.HTTPError as e:
        code = e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
        code = 0
    return code, time.perf_counter() - t0


def load_test(out: Path, n: int, concurrency: int) -> dict:
    from PIL import Image

    port = free_port()
    server = subprocess.Popen(CLI + ["serve", str(out), "--port", str(port), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1).read()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "PNG")
        img = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        good, bad = [], []
        for i in range(n):
            content = ([{"type": "image_url", "image_url": {"url": img}}] if i % 2 else []) + \
                [{"type": "text", "text": f"Describe item {i}."}]
            good.append(json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 4}).encode())
            if i % 10 == 0:
                bad.append([b"{not json", json.dumps({"messages": []}).encode(),
                            json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}).encode(),
                            json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode()
                            ][(i // 10) % 4])
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(concurrency) as pool:
            good_res = list(pool.map(lambda b: post(url + "/v1/chat/completions", b), good))
            bad_res = list(pool.map(lambda b: post(url + "/v1/chat/completions", b), bad))
        wall = time.perf_counter() - t0
        lat = sorted(t for c, t in good_res if c == 200)
        alive = post(url + "/v1/chat/completions", good[0])[0] == 200
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"requests": n, "concurrency": concurrency, "ok_200": sum(c == 200 for c, _ in good_res),
            "codes": sorted({c for c, _ in good_res}), "bad_requests": len(bad),
            "bad_answered_4xx": sum(400 <= c < 500 for c, _ in bad_res), "server_alive_after": alive,
            "wall_s": round(wall, 2), "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
            "latency_p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3) if lat else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:tiny-qwen2-vl")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: bad,kills,load")
    p.add_argument("--out", default="benchmarks/reliability.json")
    args = p.parse_args(argv)
    skip = set(args.skip.split(","))
    res: dict = {"model": args.model}
    with tempfile.TemporaryDirectory(prefix="vlmq-rel-") as td:
        tmp = Path(td)
        out = tmp / "export"
        proc = cli([args.model, "--method", "rtn", "--no-validate", "-o", str(out), "--quiet"])
        if proc.returncode != 0:
            print(f"reliability: the reference export failed: {proc.stderr.strip()[-300:]}", file=sys.stderr)
            return 1
        if "bad" not in skip:
            cases = bad_input_cases(out, args.model, tmp) + tampered_cases(out, tmp)
            rows = []
            for name, argv_ in cases:
                t0 = time.perf_counter()
                proc = cli(argv_)
                ok, last = holds(proc)
                rows.append({"case": name, "holds": ok, "rc": proc.returncode, "s": round(time.perf_counter() - t0, 2),
                             "message": last[:200]})
                print(f"{'ok ' if ok else 'BAD'} rc={proc.returncode} {name}: {last[:140]}", file=sys.stderr)
            res["bad_inputs"] = {"cases": len(rows), "held": sum(r["holds"] for r in rows), "rows": rows}
        if "kills" not in skip:
            res["kills"] = [kill_at(args.model, tmp / f"killed-{s}", s) for s in ("calibrate", "qdq", "validate")]
            print(json.dumps(res["kills"]), file=sys.stderr)
        if "load" not in skip:
            res["load"] = load_test(out, args.requests, args.concurrency)
            print(json.dumps(res["load"]), file=sys.stderr)
    try:
        from vlmq_export.testing.machine import machine_stamp

        res["machine"] = machine_stamp()
    except Exception:  # the stamp is a nicety
        pass
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"reliability: wrote {args.out}", file=sys.stderr)
    failed = (res.get("bad_inputs", {}).get("held", 0) != res.get("bad_inputs", {}).get("cases", 0)
              or any(k["left_a_complete_looking_dir"] or not k["rerun_ok"] for k in res.get("kills", []))
              or ("load" in res and res["load"]["ok_200"] != res["load"]["requests"]))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
