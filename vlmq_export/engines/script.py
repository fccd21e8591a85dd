"""OUT/build_engines.sh: trtexec commands that build the engines on the target with nothing but TensorRT's trtexec.

trtexec's grammar (NVIDIA/TensorRT samples/common/sampleOptions.cpp): one profile is --minShapes/--optShapes/
--maxShapes; several profiles in one engine are ``--profile=0 --minShapes=.. --optShapes=.. --maxShapes=..
--profile=1 ...`` (each --profile=N directly followed by its three shape flags; in trtexec's help since
TensorRT 10.5 at the latest, so the script checks the help text before relying on it). Strongly typed
always: precision lives in the graph, so never --fp16, --int8 or --best.
"""
from __future__ import annotations

import shlex

from ..targets import get_target

TIMING_CACHE = "engines/timing.cache"


def shape_spec(shapes: dict, point: str) -> str:
    """trtexec's spec: name:1x2x3,name2:4 (a 0-d input as name:)."""
    return ",".join(f"{name}:{'x'.join(map(str, s[point]))}" for name, s in shapes.items())


def trtexec_args(graph: dict) -> list[str]:
    """The trtexec arguments that build one graph's engine with all its profiles."""
    args = [f"--onnx={graph['file']}", "--stronglyTyped", f"--timingCacheFile={TIMING_CACHE}",
            f"--saveEngine={graph['engine']}", "--skipInference"]
    several = len(graph["profiles"]) > 1
    for i, prof in enumerate(graph["profiles"]):
        if several:
            args.append(f"--profile={i}")
        args += [f"--{p}Shapes={shape_spec(prof['shapes'], p)}" for p in ("min", "opt", "max")]
    return args


_HEAD = r'''#!/usr/bin/env bash
# Written by `vlmq-export build` for target {target}: builds TensorRT engines from this directory's ONNX graphs
# with trtexec (strongly typed; shapes from engines/profiles.json). Run it on the target machine itself
# (engines are not portable across TensorRT versions or GPUs):   bash build_engines.sh
# trtexec is $TRTEXEC, else the one on PATH, else /usr/src/tensorrt/bin/trtexec (JetPack).
set -euo pipefail
cd "$(dirname "${{BASH_SOURCE[0]}}")"
TARGET={target}
MIN_TRT_MAJOR={min_major}
MIN_TRT_MINOR={min_minor}
FP8={fp8}
SEVERAL_PROFILES={several}
die() {{ echo "build_engines.sh: error: $*" >&2; exit 1; }}

TRTEXEC="${{TRTEXEC:-$(command -v trtexec || true)}}"
if [ -z "$TRTEXEC" ] && [ -x /usr/src/tensorrt/bin/trtexec ]; then TRTEXEC=/usr/src/tensorrt/bin/trtexec; fi
[ -n "$TRTEXEC" ] && [ -x "$TRTEXEC" ] || die "trtexec not found: set TRTEXEC, put trtexec on PATH or install TensorRT (JetPack: /usr/src/tensorrt/bin/trtexec)"

# TensorRT version from trtexec's banner, e.g. "[TensorRT v100300]" = 10.3.0 (8.6.1 printed v8601)
HELP="$("$TRTEXEC" --help 2>&1 || true)"
V="$(printf '%s\n' "$HELP" | sed -n 's/.*\[TensorRT v\([0-9][0-9]*\)\].*/\1/p' | head -n 1)"
[ -n "$V" ] || die "cannot read the TensorRT version from '$TRTEXEC --help'"
if [ "$V" -ge 100000 ]; then MAJOR=$((V / 10000)); MINOR=$((V / 100 % 100)); else MAJOR=$((V / 1000)); MINOR=$((V / 100 % 10)); fi
if [ $((MAJOR * 100 + MINOR)) -lt $((MIN_TRT_MAJOR * 100 + MIN_TRT_MINOR)) ]; then
  die "TensorRT $MAJOR.$MINOR is older than $MIN_TRT_MAJOR.$MIN_TRT_MINOR, the minimum for target $TARGET"
fi
if [ "$SEVERAL_PROFILES" = 1 ] && ! printf '%s\n' "$HELP" | grep -q -- 'multiple profiles'; then
  die "this trtexec (TensorRT $MAJOR.$MINOR) cannot put several optimization profiles in one engine (--profile=N); build with the tensorrt Python package instead: vlmq-export build $(pwd)"
fi

# The GPU against the target
MODEL=""
if [ -r /proc/device-tree/model ]; then MODEL="$(tr -d '\0' < /proc/device-tree/model)"; fi
TEGRA=""
GPU=""
if [ -r /etc/nv_tegra_release ]; then TEGRA="$(head -n 1 /etc/nv_tegra_release)"; fi
case "$TARGET" in
  jetson-orin)
    [[ "$MODEL" == *Orin* ]] || die "target jetson-orin, but this machine is '${{MODEL:-not a Jetson}}' ${{TEGRA:+($TEGRA)}}" ;;
  jetson-thor)
    [[ "$MODEL" == *Thor* ]] || die "target jetson-thor, but this machine is '${{MODEL:-not a Jetson}}' ${{TEGRA:+($TEGRA)}}" ;;
  tensorrt)
    command -v nvidia-smi > /dev/null || die "target tensorrt needs an NVIDIA GPU and driver: nvidia-smi not found"
    CC="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2> /dev/null | head -n 1 | tr -d ' ' || true)"
    [[ "$CC" =~ ^[0-9]+\.[0-9]+$ ]] || die "cannot read a GPU's compute capability from nvidia-smi (no GPU, or a driver too old to report it)"
    CCN=$(( ${{CC%%.*}} * 10 + ${{CC##*.}} ))
    [ "$CCN" -ge 80 ] || die "GPU compute capability $CC: INT4 weight-only needs 8.0 or later (Ampere+)"
    if [ "$FP8" = 1 ] && [ "$CCN" -lt 89 ]; then die "FP8 graphs need compute capability 8.9 or later, this GPU has $CC"; fi
    GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)" ;;
esac
if [ "$FP8" = 1 ] && [[ "$MODEL ${{GPU:-}}" == *Orin* ]]; then
  die "these graphs are FP8 and Orin has no FP8 (INT8/INT4/FP16 only): export them without FP8 for jetson-orin"
fi

mkdir -p engines
echo "building engines for $TARGET with TensorRT $MAJOR.$MINOR on ${{GPU:-${{MODEL:-this GPU}}}}; log: engines/build.log"
run() {{ echo "+ $*" >> engines/build.log; "$@" >> engines/build.log 2>&1 || die "$(basename "$1") failed, see engines/build.log"; }}
'''


def render_script(profiles: dict, target: str, fp8: bool) -> str:
    """The whole build_engines.sh for ``profiles`` (derive_profiles' result)."""
    min_trt = get_target(target).min_trt  # the oldest TensorRT the target ships (targets.py)
    graphs = profiles["graphs"]
    text = _HEAD.format(target=target, min_major=min_trt[0], min_minor=min_trt[1],
                        fp8=int(fp8), several=int(any(len(g["profiles"]) > 1 for g in graphs.values())))
    for name, graph in graphs.items():
        text += f'echo "{name} -> {graph["engine"]}"\n'
        text += 'run "$TRTEXEC" ' + " ".join(shlex.quote(a) for a in trtexec_args(graph)) + "\n"
    text += 'echo "done: $(ls engines/*.plan | tr \'\\n\' \' \')"\n'
    return text
