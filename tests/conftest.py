import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("VLMQ_ORT_THREADS", "2")


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
