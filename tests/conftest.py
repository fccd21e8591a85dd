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
