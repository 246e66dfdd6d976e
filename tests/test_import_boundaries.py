"""The structure rules of the code base, checked on every run.

Importing any edgecloud, converters or device_agent module must not pull in heavy dependencies:
a device installs edgecloud with onnxruntime, paho-mqtt and httpx only; an accidental top-level
``import torch`` or ``import tensorrt`` would break it there. Run in a fresh interpreter so modules
imported by other tests do not hide a leak.

Below those, the rules of docs/architecture.md ("Rules of the tree"), by static analysis: no
import circle (module level: none at all; through imports inside functions: only the listed
ones, each with its owner), no private module imported from outside its package, no module over
500 lines without a ``Size:`` reason at the top of its docstring, the environment read in one
module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("tensorrt", "torch", "cuda", "pycuda", "tritonclient", "sklearn", "matplotlib")


def _all_modules() -> list[str]:
    mods = []
    for pkg in ("edgecloud", "converters", "device_agent"):
        for p in sorted((ROOT / pkg).rglob("*.py")):
            rel = p.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods.append(".".join(parts))
    return mods


def test_every_module_imports_without_heavy_dependencies() -> None:
    mods = _all_modules()
    assert "edgecloud.errors" in mods
    code = textwrap.dedent(
        f"""
        import importlib, sys, json
        failed = {{}}
        for m in {mods!r}:
            try:
                importlib.import_module(m)
            except Exception as exc:
                failed[m] = f"{{type(exc).__name__}}: {{exc}}"
        heavy = sorted(k for k in sys.modules if k.split('.')[0] in {FORBIDDEN!r})
        print(json.dumps({{"failed": failed, "heavy": heavy}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}, result["failed"]
    assert result["heavy"] == [], f"heavy modules imported: {result['heavy']}"


def test_import_edgecloud_is_light() -> None:
    code = (
        "import sys, edgecloud, edgecloud.errors, edgecloud.package;"
        "print(sorted(k for k in ('onnxruntime','httpx','paho','starlette','uvicorn') "
        "if k in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ the structure rules of #10
# Static analysis of the source (no import runs): the import graph of the three packages, the
# private modules, module sizes and environment reads. Entries in the allow-lists below name
# the engineer whose area the module is in and why it is there; an entry that no longer
# matches anything fails too, so each list only ever shrinks.

PACKAGES = ("edgecloud", "converters", "device_agent")

#: Import circles that exist only through function-level (lazy) imports, with why.
KNOWN_LAZY_CIRCLES: dict[frozenset[str], str] = {
    frozenset(
        {
            "edgecloud.calibration",
            "edgecloud.routing.confidence",
            "edgecloud.routing.task_confidence",
        }
    ): ("r15/client: calibration reads confidence rules that read calibrators back (#15)"),
}

#: Private modules imported from outside their package, while their owner moves them.
KNOWN_PRIVATE_IMPORTS: dict[tuple[str, str], str] = {
    (importer, "edgecloud.transport._mqtt_common"): (
        "mqtt: replaced by the public edgecloud/mqtt/ package (#10 part 1)"
    )
    for importer in (
        "edgecloud.cloud.mqtt_worker",
        "edgecloud.fleet.controller",
        "device_agent.agent",
        "edgecloud.cli._demo_console",
    )
}

#: Line count above which a module's docstring must say why it is that long.
MAX_LINES = 500
#: The marker: a docstring line starting with it, in the docstring's first SIZE_LINES lines.
SIZE_MARKER = "Size:"
SIZE_LINES = 6
#: Modules over MAX_LINES without a reason yet, each with the engineer splitting it.
KNOWN_LONG: dict[str, str] = {
    "edgecloud/calibration.py": "r15 (#15)",
    "edgecloud/transport/_mqtt_common.py": "mqtt: becomes edgecloud/mqtt/ (#10 part 1)",
    "edgecloud/cloud/mqtt_worker.py": "mqtt (#10 part 1)",
    "edgecloud/fleet/controller.py": "mqtt (#10 part 1)",
    "device_agent/agent.py": "mqtt: the Agent split (#10 part 2)",
}
#: Generated code, regenerated by a script and never edited by hand.
GENERATED = ("edgecloud/transport/_proto/",)

#: The one module that reads the environment (see its docstring for the variables).
ENVIRONMENT_MODULE = "edgecloud/environment.py"


@dataclass(frozen=True)
class _Import:
    importer: str
    target: str
    line: int
    lazy: bool  # inside a function: runs when called, not when the importer is imported


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package) for every module of the three packages."""
    out: dict[str, tuple[Path, bool]] = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _import_nodes(
    body: list[ast.stmt], lazy: bool = False
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement that runs, with whether it runs only inside a function.

    ``if TYPE_CHECKING:`` bodies never run, so they are no edge (their ``else`` is)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, lazy
            continue
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from _import_nodes(node.orelse, lazy)
            continue
        inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for field in ("body", "orelse", "finalbody"):
            sub = getattr(node, field, None)
            if isinstance(sub, list):
                yield from _import_nodes(sub, inner)
        for handler in getattr(node, "handlers", ()):
            yield from _import_nodes(handler.body, inner)
        for case in getattr(node, "cases", ()):
            yield from _import_nodes(case.body, inner)


def _imports() -> list[_Import]:
    mods = _modules()
    found: list[_Import] = []
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        for node, lazy in _import_nodes(ast.parse(path.read_text(), str(path)).body):
            targets: list[str]
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.append(_Import(name, target, node.lineno, lazy))
    return found


def _circles(edges: list[_Import]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    succ: dict[str, set[str]] = {}
    for e in edges:
        succ.setdefault(e.importer, set()).add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(succ):
        if root in index:
            continue
        work = [(root, iter(sorted(succ.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(succ.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
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
                    found.append(frozenset(comp))
    return found


def _describe(circle: frozenset[str], edges: list[_Import]) -> str:
    inside = [e for e in edges if e.importer in circle and e.target in circle]
    return "; ".join(
        f"{e.importer}:{e.line} -> {e.target}{' (in a function)' if e.lazy else ''}"
        for e in sorted(inside, key=lambda e: (e.importer, e.line))
    )


def test_the_import_graph_sees_the_imports_it_must() -> None:
    # The analysis itself: known edges of each kind are found, TYPE_CHECKING ones are not.
    edges = _imports()
    pairs = {(e.importer, e.target, e.lazy) for e in edges}
    assert ("edgecloud.cloud.batcher", "edgecloud.runtime.ort", False) in pairs
    assert ("edgecloud.cli.demo", "edgecloud.cli._demo_console", True) in pairs
    assert (
        "edgecloud.transport.grpc",
        "edgecloud.transport._proto.grpc_predict_v2_pb2",
        True,
    ) in pairs
    fake = [
        _Import("a", "b", 1, False),
        _Import("b", "c", 1, False),
        _Import("c", "a", 1, True),
        _Import("c", "d", 1, False),
    ]
    assert _circles(fake) == [frozenset({"a", "b", "c"})]
    assert _circles([e for e in fake if not e.lazy]) == []


def test_no_import_circle_at_module_level() -> None:
    edges = [e for e in _imports() if not e.lazy]
    circles = _circles(edges)
    assert circles == [], "\n".join(_describe(c, edges) for c in circles)


def test_lazy_import_circles_are_only_the_known_ones() -> None:
    edges = _imports()
    circles = _circles(edges)
    new = [c for c in circles if not any(c <= known for known in KNOWN_LAZY_CIRCLES)]
    assert new == [], "new import circle(s): " + "\n".join(_describe(c, edges) for c in new)
    stale = [k for k in KNOWN_LAZY_CIRCLES if not any(c <= k for c in circles)]
    assert stale == [], f"these circles are gone: remove them from KNOWN_LAZY_CIRCLES: {stale}"


def _private_part(module: str) -> str | None:
    """The package a private module belongs to, when any part of its name is private."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def test_no_private_module_is_imported_from_outside_its_package() -> None:
    """``pkg/_x.py`` (or anything under ``pkg/_x/``) is imported only by modules under ``pkg/``.

    A module that another package needs is public: it gets a name without the underscore and a
    docstring that is its contract."""
    bad: dict[tuple[str, str], int] = {}
    for e in _imports():
        owner = _private_part(e.target)
        if owner is None or e.importer == owner or e.importer.startswith(owner + "."):
            continue
        bad.setdefault((e.importer, e.target), e.line)
    new = {k: v for k, v in bad.items() if k not in KNOWN_PRIVATE_IMPORTS}
    assert new == {}, "private modules imported across packages: " + ", ".join(
        f"{imp}:{line} -> {tgt}" for (imp, tgt), line in sorted(new.items())
    )
    stale = sorted(k for k in KNOWN_PRIVATE_IMPORTS if k not in bad)
    existing = {m for m in _modules()}
    stale = [k for k in stale if k[1] in existing and k[0] in existing]
    assert stale == [], f"no longer imported: remove from KNOWN_PRIVATE_IMPORTS: {stale}"


def _docstring_head(path: Path) -> list[str]:
    doc = ast.get_docstring(ast.parse(path.read_text(), str(path))) or ""
    return doc.splitlines()[:SIZE_LINES]


def test_long_modules_say_why_at_their_top() -> None:
    """A module over MAX_LINES lines carries ``Size: <reason>`` near its docstring's top.

    Long is allowed where one job is long (a state machine read top to bottom); it is not
    allowed by accident, and a reader learns which it is before reading the module."""
    long_: dict[str, int] = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            rel = p.relative_to(ROOT).as_posix()
            if rel.startswith(GENERATED):
                continue
            n = len(p.read_text().splitlines())
            if n > MAX_LINES and not any(
                line.strip().startswith(SIZE_MARKER) for line in _docstring_head(p)
            ):
                long_[rel] = n
    new = {k: v for k, v in long_.items() if k not in KNOWN_LONG}
    assert new == {}, (
        f"modules over {MAX_LINES} lines with no '{SIZE_MARKER} <reason>' line at the top of "
        f"their docstring: {new}"
    )
    stale = sorted(k for k in KNOWN_LONG if k not in long_)
    assert stale == [], f"now short or with a reason: remove from KNOWN_LONG: {stale}"


def test_environment_is_read_in_one_module() -> None:
    """Only edgecloud/environment.py reads ``os.environ``/``os.getenv``; the rest call it."""
    readers: list[str] = []
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            rel = p.relative_to(ROOT).as_posix()
            if rel == ENVIRONMENT_MODULE or rel.startswith(GENERATED):
                continue
            for node in ast.walk(ast.parse(p.read_text(), rel)):
                named = (
                    node.attr
                    if isinstance(node, ast.Attribute)
                    else (node.id if isinstance(node, ast.Name) else None)
                )
                if named in ("environ", "getenv", "environb", "putenv"):
                    readers.append(f"{rel}:{getattr(node, 'lineno', 0)}")
                if isinstance(node, ast.ImportFrom) and node.module == "os":
                    names = {a.name for a in node.names}
                    if names & {"environ", "getenv", "environb"}:
                        readers.append(f"{rel}:{node.lineno}")
    assert readers == [], f"read the environment through {ENVIRONMENT_MODULE}: {readers}"


def test_the_size_marker_is_read_from_the_docstring_top(tmp_path: Path) -> None:
    long_body = "x = 1\n" * (MAX_LINES + 1)
    with_reason = tmp_path / "a.py"
    with_reason.write_text(
        f'"""One job.\n\n{SIZE_MARKER} one state machine, read top down.\n"""\n' + long_body
    )
    too_deep = tmp_path / "b.py"
    too_deep.write_text(
        '"""One job.\n' + "\n" * SIZE_LINES + f'{SIZE_MARKER} too late.\n"""\n' + long_body
    )
    assert any(line.startswith(SIZE_MARKER) for line in _docstring_head(with_reason))
    assert not any(line.startswith(SIZE_MARKER) for line in _docstring_head(too_deep))
