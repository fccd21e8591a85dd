import importlib.util
import math
import os
from pathlib import Path

import pytest

# Under pytest-xdist (scripts/test.sh runs 2 workers) each worker gets its share of the cores, so that two
# workers do not each spin up a full set of torch and ONNX Runtime threads on a 2-core machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, (os.cpu_count() or 2) // _WORKERS)
os.environ.setdefault("VLMQ_ORT_THREADS", str(min(2, _THREADS)))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Qwen2-VL and SmolVLM model directories, built once per session."""
    from vlmq_export.testing.tiny_qwen2_vl import make_tiny_qwen2_vl
    from vlmq_export.testing.tiny_smolvlm import make_tiny_smolvlm

    root = tmp_path_factory.mktemp("models")
    return {"qwen2_vl": make_tiny_qwen2_vl(root / "qwen2_vl"), "smolvlm": make_tiny_smolvlm(root / "smolvlm")}


def load_tool(name: str):
    """Import ``tools/<name>.py`` (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def keep_torch_threads():
    """A tool's main sets torch's thread count (--threads): give the rest of the session its own back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# One Linear layer's calibration problem, shared by the calibrator tests (test_calibrators, test_gptaq)
N, K, T = 64, 256, 768  # out features, in features, calibration tokens


def correlated(tokens: int, seed: int, k: int = K, scale: float = 1.0):
    """x = z @ A: inputs with a non-diagonal covariance (GPTQ has something to exploit)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(k, k, generator=gen) / math.sqrt(k)
    return scale * torch.randn(tokens, k, generator=gen) @ A


@pytest.fixture(scope="module")
def W():
    """The layer's weight, N x K."""
    import torch

    return torch.randn(N, K, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def X():
    """The full-precision model's inputs to the layer, T x K."""
    return correlated(T, seed=1)


def pytest_collection_modifyitems(config, items):
    """Slow tests first: with pytest-xdist's --dist loadfile a worker takes whole files in collection order, so the
    longest files (the real-weight checks) must start at once instead of last, or the run waits on them alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the order is otherwise kept
