"""The public API as a user's type checker sees it.

``edgecloud/__init__.py`` resolves names lazily at run time; without ``TYPE_CHECKING`` imports
mypy would see ``HybridClient`` as ``Any`` and accept any call. This runs the real mypy on a small
user script, the way a user's CI would, and expects the wrong keyword to be caught.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import edgecloud

USER_SCRIPT = """\
from edgecloud import HybridClient, HybridResult, InferRequest, MockTransport

def answer(r: HybridResult) -> str:
    return r.source

client = HybridClient("model.pkg", nonexistent_kw=1)
"""


@pytest.mark.slow
def test_mypy_sees_the_real_classes_behind_lazy_names(tmp_path: Path) -> None:
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert 'Unexpected keyword argument "nonexistent_kw" for "HybridClient"' in out
    # Only that line is wrong: the other names resolved to real, typed classes.
    assert "Found 1 error in 1 file" in out, out


def test_every_public_name_resolves_at_run_time() -> None:
    for name in edgecloud.__all__:
        assert getattr(edgecloud, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = edgecloud.nope  # type: ignore[attr-defined]
