"""``edgecloud convert`` end to end in a subprocess: package, signature, --json, tampering."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.bench import run_benchmark

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgecloud", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, samples_dir: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    key = d / "signing.key"
    r = _cli("keys", "generate", "--out", key)
    assert r.returncode == 0, r.stderr
    pkg = d / "pkg"
    r = _cli(
        "convert",
        samples_dir / "models/digits_cloud.onnx",
        "--out",
        pkg,
        "--int8",
        "static",
        "--calib",
        samples_dir / "data/cloud_calib.npz",
        "--val",
        samples_dir / "data/cloud_val.npz",
        "--sign",
        key,
        "--name",
        "digits",
        "--version",
        "2",
        "--latency-runs",
        "3",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    return {
        "dir": d,
        "key": key,
        "pub": d / "signing.key.pub",
        "pkg": pkg,
        "stdout": r.stdout,
        "stderr": r.stderr,
    }  # type: ignore[dict-item]


def test_json_report_parses(signed: dict[str, Path]) -> None:
    report = json.loads(str(signed["stdout"]))
    assert report["ok"] is True
    assert [v["name"] for v in report["variants"]] == ["fp32", "int8_static"]
    int8 = report["variants"][1]
    assert int8["verdict"] == "accepted"
    assert int8["size_ratio"] <= 0.30
    assert int8["gate"]["metric"] == "accuracy"
    assert report["manifest"]["name"] == "digits"
    assert report["manifest"]["version"] == "2"
    assert "━" not in str(signed["stderr"])  # --json: no progress bars


def test_signed_package_verifies(signed: dict[str, Path]) -> None:
    r = _cli("package", "verify", signed["pkg"], "--public-key", signed["pub"], "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is True
    assert out["signed_by"]
    assert out["files"] == 3  # fp32.onnx, int8_static.onnx, warmup.npz


def test_tampered_package_fails_naming_the_file(signed: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(signed["pkg"], copy)
    with open(copy / "int8_static.onnx", "r+b") as f:
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 0xFF]))
    r = _cli("package", "verify", copy, "--public-key", signed["pub"], "--json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["ok"] is False
    assert out["file"] == "int8_static.onnx"
    assert "sha256" in out["error"]


def test_table_and_exit_code_when_refused(tmp_path: Path, samples_dir: Path) -> None:
    r = _cli(
        "convert",
        samples_dir / "models/digits_cloud.onnx",
        "--out",
        tmp_path / "pkg",
        "--fp16",
        "--int8",
        "static",
        "--calib",
        samples_dir / "data/cloud_calib.npz",
        "--val",
        samples_dir / "data/cloud_val.npz",
        "--tolerance",
        "0.1",
        "--latency-runs",
        "3",
        "--no-search",
    )
    assert r.returncode == 1, r.stderr  # a variant was refused
    assert "refused int8_static (not written)" in " ".join(r.stdout.split())
    assert "fp16" in r.stdout
    assert "accepted" in r.stdout
    assert "calibrating int8" in r.stderr  # progress on stderr
    assert (tmp_path / "pkg" / "fp16.onnx").exists()
    assert not (tmp_path / "pkg" / "int8_static.onnx").exists()


def test_existing_output_needs_force(signed: dict[str, Path], samples_dir: Path) -> None:
    before = sorted(p.name for p in signed["pkg"].iterdir())
    r = _cli(
        "convert",
        samples_dir / "models/digits_edge.onnx",
        "--out",
        signed["pkg"],
        "--val",
        samples_dir / "data/edge_val.npz",
    )
    assert r.returncode == 2
    assert "already exists" in r.stderr
    assert "--force" in r.stderr
    assert sorted(p.name for p in signed["pkg"].iterdir()) == before


def test_force_replaces_and_leaves_no_temp_files(tmp_path: Path, samples_dir: Path) -> None:
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    r = _cli(
        "convert",
        samples_dir / "models/digits_edge.onnx",
        "--out",
        out,
        "--force",
        "--val",
        samples_dir / "data/edge_val.npz",
        "--int8",
        "dynamic",
        "--json",
        "--latency-runs",
        "3",
    )
    assert r.returncode == 0, r.stderr
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    r = _cli("package", "verify", out, "--unsigned-ok")
    assert r.returncode == 0, r.stdout


def test_benchmark_quick_runs_and_prints_ratios() -> None:
    out = run_benchmark("convert", "--quick", "--threads", "1", "--rounds", "3")
    rows = [line for line in out.splitlines() if line.startswith("| digits_")]
    assert len(rows) == 10  # 2 models x (fp32, fp16, u8s8, s8s8, dynamic)
    fp32 = next(line for line in rows if "digits_cloud" in line and "| fp32 " in line)
    assert "1.00x" in fp32
    u8s8 = next(line for line in rows if "digits_cloud" in line and "u8s8" in line)
    cols = [c.strip() for c in u8s8.split("|")]
    assert float(cols[4]) <= 0.30  # size ratio to FP32


def test_json_stays_clean_with_histogram_calibration(tmp_path: Path, samples_dir: Path) -> None:
    """onnxruntime's entropy/percentile calibrators print(); none of it may reach stdout."""
    r = _cli(
        "convert",
        samples_dir / "models/digits_edge.onnx",
        "--out",
        tmp_path / "pkg",
        "--int8",
        "static",
        "--calib",
        samples_dir / "data/edge_calib.npz",
        "--calib-method",
        "percentile",
        "--calib-samples",
        "64",
        "--val",
        samples_dir / "data/edge_val.npz",
        "--latency-runs",
        "3",
        "--json",
    )
    assert r.returncode in (0, 1), r.stderr
    report = json.loads(r.stdout)
    int8 = report["variants"][1]
    assert int8["settings"]["calib_method"] == "percentile"
    assert report["manifest"]["metadata"]["calibration"]["samples"] == 64
