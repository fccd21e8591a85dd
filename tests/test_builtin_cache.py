"""The cache of built-in models: reused while it was built from the same parts, rebuilt when they change (an
upgraded package with a newly trained testbed must not serve the old assembly)."""
from __future__ import annotations

import json

from vlmq_export import sources


def test_a_cached_builtin_is_reused_until_its_parts_change(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMQ_CACHE", str(tmp_path))
    path = sources.resolve_model("builtin:tiny-smolvlm")
    assert (path / sources.BUILT_FROM).read_text().strip() == sources.builtin_version("tiny-smolvlm")
    mtime = (path / "config.json").stat().st_mtime_ns
    assert sources.resolve_model("builtin:tiny-smolvlm") == path
    assert (path / "config.json").stat().st_mtime_ns == mtime  # reused
    monkeypatch.setattr(sources, "builtin_version", lambda name: "new parts")
    assert sources.resolve_model("builtin:tiny-smolvlm") == path
    assert (path / sources.BUILT_FROM).read_text().strip() == "new parts"
    assert (path / "config.json").stat().st_mtime_ns != mtime  # rebuilt
    assert not list(tmp_path.glob("builtin/.tiny-smolvlm.tmp-*"))


def test_a_cache_from_before_the_stamp_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMQ_CACHE", str(tmp_path))
    old = tmp_path / "builtin" / "tiny-smolvlm"
    old.mkdir(parents=True)
    (old / "config.json").write_text(json.dumps({"model_type": "stale"}))
    path = sources.resolve_model("builtin:tiny-smolvlm")
    assert json.loads((path / "config.json").read_text())["model_type"] != "stale"


def test_the_testbeds_version_follows_its_meta():
    from vlmq_export.testbed import ASSETS

    v = sources.builtin_version("shapes-smolvlm")
    assert v not in ("1", "missing") and len(v) == 16 and (ASSETS / "meta.json").is_file()
    assert sources.builtin_version("tiny-qwen2-vl") == "1"
