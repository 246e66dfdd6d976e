"""Model package: atomic writing, signatures, hashes, archives, and the CLI around them."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgecloud.errors import IntegrityError, PackageError, SignatureError
from edgecloud.package import (
    Manifest,
    TensorSpec,
    Variant,
    generate_keypair,
    load_private_key,
    load_public_key,
    pack_package,
    read_manifest,
    unpack_package,
    verify_package,
    write_package,
)


def _manifest() -> Manifest:
    return Manifest(
        name="digits",
        version="1.0.0",
        inputs=(TensorSpec("input", "float32", ("batch", 64)),),
        outputs=(TensorSpec("logits", "float32", ("batch", 10)),),
        variants=(Variant("fp32", "model.fp32.onnx", "onnx", "fp32", "cpu", 0, ""),),
        labels=tuple(str(i) for i in range(10)),
        source_sha256="ab" * 32,
    )


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys" / "fleet")


@pytest.fixture
def pkg(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    src = tmp_path / "src.onnx"
    src.write_bytes(b"\x08\x01" * 1000)
    out = tmp_path / "pkg"
    write_package(out, _manifest(), {"model.fp32.onnx": src}, signing_key=load_private_key(keys[0]))
    return out


def test_private_key_is_owner_only(keys: tuple[Path, Path]) -> None:
    mode = stat.S_IMODE(os.stat(keys[0]).st_mode)
    assert mode == 0o600
    assert b"PUBLIC KEY" in keys[1].read_bytes()


def test_written_package_verifies_and_records_hashes(pkg: Path, keys: tuple[Path, Path]) -> None:
    loaded = verify_package(pkg, load_public_key(keys[1]))
    v = loaded.manifest.variant("fp32")
    assert v.size == 2000
    assert len(v.sha256) == 64
    assert loaded.signed_by is not None
    assert loaded.path_of("fp32").read_bytes() == b"\x08\x01" * 1000


def test_manifest_roundtrip(pkg: Path) -> None:
    m = read_manifest(pkg)
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert m.inputs[0].shape == ("batch", 64)


def test_changed_model_byte_is_named(pkg: Path, keys: tuple[Path, Path]) -> None:
    f = pkg / "model.fp32.onnx"
    data = bytearray(f.read_bytes())
    data[10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.fp32\.onnx.*sha256") as ei:
        verify_package(pkg, load_public_key(keys[1]))
    assert ei.value.path == "model.fp32.onnx"


def test_changed_manifest_fails_signature(pkg: Path, keys: tuple[Path, Path]) -> None:
    mpath = pkg / "manifest.json"
    d = json.loads(mpath.read_bytes())
    d["version"] = "6.6.6"
    mpath.write_text(json.dumps(d, sort_keys=True, indent=2) + "\n")
    with pytest.raises(SignatureError, match=r"manifest\.json"):
        verify_package(pkg, load_public_key(keys[1]))


def test_other_key_is_refused(pkg: Path, tmp_path: Path) -> None:
    _, other_pub = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError, match="signed by key"):
        verify_package(pkg, load_public_key(other_pub))


def test_unlisted_file_is_refused(pkg: Path, keys: tuple[Path, Path]) -> None:
    (pkg / "planted.so").write_bytes(b"x")
    with pytest.raises(IntegrityError, match=r"planted\.so.*not listed"):
        verify_package(pkg, load_public_key(keys[1]))


def test_missing_signature_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes(b"abc")
    out = write_package(tmp_path / "unsigned", _manifest(), {"model.fp32.onnx": src})
    assert out.variants[0].size == 3
    with pytest.raises(SignatureError, match="not signed"):
        verify_package(tmp_path / "unsigned", load_public_key(keys[1]))
    # Hashes alone can still be checked explicitly.
    verify_package(tmp_path / "unsigned", None, require_signature=False)


def test_existing_output_is_kept_without_force(pkg: Path, tmp_path: Path) -> None:
    before = (pkg / "manifest.json").read_bytes()
    src = tmp_path / "new.onnx"
    src.write_bytes(b"new")
    with pytest.raises(PackageError, match="already exists"):
        write_package(pkg, _manifest(), {"model.fp32.onnx": src})
    assert (pkg / "manifest.json").read_bytes() == before
    write_package(pkg, _manifest(), {"model.fp32.onnx": src}, force=True)
    assert read_manifest(pkg).variants[0].size == 3
    assert not [p for p in pkg.parent.iterdir() if p.name.startswith(".pkg.")]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    with pytest.raises(FileNotFoundError):
        write_package(out, _manifest(), {"model.fp32.onnx": tmp_path / "missing.onnx"})
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_bad_file_names_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "m"
    src.write_bytes(b"x")
    with pytest.raises(PackageError, match="not allowed"):
        write_package(tmp_path / "p", _manifest(), {"../evil": src, "model.fp32.onnx": src})


def test_archive_roundtrip(pkg: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    arc = pack_package(pkg, tmp_path / "pkg.tar.gz")
    out = unpack_package(arc.read_bytes(), tmp_path / "unpacked")
    verify_package(out, load_public_key(keys[1]))
    with pytest.raises(PackageError, match="not a readable"):
        unpack_package(b"not a tarball", tmp_path / "junk")
    assert not (tmp_path / "junk").exists()


def test_malformed_manifests_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="not valid JSON"):
        Manifest.from_json(b"{nope")
    with pytest.raises(PackageError, match="schema_version 99 is newer"):
        Manifest.from_dict({"schema_version": 99})
    with pytest.raises(PackageError, match="missing 'inputs'"):
        Manifest.from_dict({"schema_version": 1, "name": "m", "version": "1"})
    with pytest.raises(PackageError, match="unknown dtype"):
        TensorSpec("x", "float33", (1,))
    with pytest.raises(PackageError, match="no variant 'int8'"):
        _manifest().variant("int8")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgecloud", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_keys_verify_inspect(tmp_path: Path) -> None:
    r = _cli("keys", "generate", "--out", str(tmp_path / "k"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert Path(info["public_key"]).exists()
    r = _cli("keys", "generate", "--out", str(tmp_path / "k"))
    assert r.returncode == 2
    assert "already exists" in r.stderr

    src = tmp_path / "m.onnx"
    src.write_bytes(b"model bytes")
    pkg = tmp_path / "pkg"
    write_package(
        pkg, _manifest(), {"model.fp32.onnx": src}, signing_key=load_private_key(tmp_path / "k")
    )
    r = _cli("package", "verify", str(pkg), "--public-key", str(tmp_path / "k.pub"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: digits 1.0.0" in r.stdout
    r = _cli("package", "inspect", str(pkg), "--json")
    assert json.loads(r.stdout)["name"] == "digits"
    r = _cli("package", "inspect", str(pkg))
    assert "model.fp32.onnx" in r.stdout

    (pkg / "model.fp32.onnx").write_bytes(b"model bytez")
    r = _cli("package", "verify", str(pkg), "--public-key", str(tmp_path / "k.pub"))
    assert r.returncode == 1
    assert "model.fp32.onnx" in r.stdout
