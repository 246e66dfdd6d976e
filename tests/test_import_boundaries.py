"""Importing any edgecloud, converters or device_agent module must not pull in heavy dependencies.

A device installs edgecloud with onnxruntime, paho-mqtt and httpx only; an accidental top-level
``import torch`` or ``import tensorrt`` would break it there. Run in a fresh interpreter so modules
imported by other tests do not hide a leak.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
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
