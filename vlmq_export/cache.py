"""Where vlmq-export caches what it builds or converts (built-in models, SmolLM2's converted weights)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$VLMQ_CACHE``, else ``~/.cache/vlmq-export``."""
    return Path(os.environ.get("VLMQ_CACHE", Path.home() / ".cache" / "vlmq-export"))
