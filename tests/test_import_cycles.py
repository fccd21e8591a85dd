"""vlmq_export's modules import one another without cycles, counting the imports inside functions too.

A lazy (function-level) import does not fail at run time, but a cycle through one still ties the modules
together: ``sources -> testbed -> testing -> sources`` (issue 22) made the built-in registry, the testbed and
the tests' tiny makers one knot. Read with ``ast``, nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

import vlmq_export

PACKAGE = Path(vlmq_export.__file__).resolve().parent

# Known, and to be broken by whoever next edits these files (both the same pattern: a function-level import one
# way, a top-level one back): report.write_report imports html.render_html, html imports report's Section and
# layer_kind; qdq imports act_qdq.ActQDQPass, act_qdq imports qdq's QuantizedLinear and linear_weight_key.
ALLOWED = {frozenset({"vlmq_export.validate.html", "vlmq_export.validate.report"})}


def module_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package's modules it imports anywhere in its source}; ``pkg.__init__`` is named ``pkg``."""
    files = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        if is_init:
            parts.pop()
        files[".".join(parts)] = (path, parts if is_init else parts[:-1])

    def known(name: str) -> str | None:  # the module itself, else its closest package
        while name not in files and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in files else None

    graph = {}
    for mod, (path, pkg) in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(known(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(pkg[:len(pkg) - node.level + 1]) if node.level else ""
                base = ".".join(p for p in (base, node.module or "") if p)
                # `from pkg import mod` imports the submodule; `from mod import name` the module
                deps.update(known(f"{base}.{a.name}") if f"{base}.{a.name}" in files else known(base)
                            for a in node.names)
        deps.discard(None)
        deps.discard(mod)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        x = stack.pop()
                        on_stack.discard(x)
                        comp.add(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        out.append(frozenset(comp))
            elif w not in index:
                index[w] = low[w] = len(index)
                stack.append(w)
                on_stack.add(w)
                work.append((w, iter(sorted(graph.get(w, ())))))
            elif w in on_stack:
                low[v] = min(low[v], index[w])
    return out


def test_graph_sees_lazy_and_relative_imports():
    graph = module_graph()
    assert "vlmq_export.testbed" in graph["vlmq_export.sources"]  # inside _builtin_makers
    assert "vlmq_export.cache" in graph["vlmq_export.testbed.smollm2"]  # `from ..cache import`, in a function
    assert "vlmq_export.testbed.smolvlm_smollm2" in graph["vlmq_export.testbed.assemble"]


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = [sorted(c) for c in cycles(module_graph()) if c not in ALLOWED]
    assert not found, f"import cycles among vlmq_export's modules: {found}"


def test_testbed_is_not_built_from_the_tests_package():
    """The testbed (product code) needs no test helper but the tiny SmolVLM's config/processor writers."""
    graph = module_graph()
    testbed = [m for m in graph if m.startswith("vlmq_export.testbed")]
    uses = {d for m in testbed for d in graph[m] if d.startswith("vlmq_export.testing")}
    assert uses <= {"vlmq_export.testing.tiny_smolvlm"}, uses
