"""What a benchmark ran on. GPTQ-family results depend on it: the same code and data on another CPU (or
with another thread count) sums in another order, and GPTQ's rounding decisions cascade through the blocks
(testbed GPTQ W4 English perplexity 39.1 on one 2-core machine, 40.9 on another, 42.6 there with 1 thread;
``benchmarks/quality.md``). A benchmark file says where it was measured."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_stamp() -> dict:
    """CPU model and count, Python, torch and its thread count: enough to tell two runs' machines apart."""
    import torch

    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
