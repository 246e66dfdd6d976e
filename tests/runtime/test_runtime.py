"""Local runtime: package loading (verified first), variant choice, providers, input validation.

Real onnxruntime sessions on the sample digits models throughout; ``make_package`` is also used by
the routing, client and end-to-end tests to build signed packages from the sample ONNX files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgecloud.errors import (
    BackendUnavailableError,
    ConfigError,
    DTypeError,
    InputError,
    IntegrityError,
    MissingDependencyError,
    NonFiniteError,
    PackageError,
    ShapeError,
    SignatureError,
)
from edgecloud.package import (
    Manifest,
    TensorSpec,
    Variant,
    generate_keypair,
    load_private_key,
    load_public_key,
    verify_package,
    write_package,
)
from edgecloud.runtime import (
    InputPolicy,
    OnnxRuntimeBackend,
    choose_providers,
    load_backend,
    select_variant,
)
from tests.fixtures.packages import EDGE_ONNX, SAMPLES
from tests.fixtures.packages import signed_sample_package as make_package


@pytest.fixture(scope="module")
def edge_pkg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_package(tmp_path_factory.mktemp("rt") / "edge")


@pytest.fixture(scope="module")
def backend(edge_pkg: tuple[Path, Path]) -> OnnxRuntimeBackend:
    pkg, pub = edge_pkg
    b = load_backend(pkg, public_key=pub, threads=1)
    assert isinstance(b, OnnxRuntimeBackend)
    return b


@pytest.fixture(scope="module")
def val() -> dict[str, np.ndarray]:
    d = np.load(SAMPLES / "data" / "edge_val.npz")
    return {"input": d["input"], "labels": d["labels"]}


def test_keypair_layout_is_what_make_package_assumes(tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path / "k")
    assert pub == priv.with_name("k.pub")
    load_public_key(pub)


def test_loaded_backend_matches_raw_onnxruntime(
    backend: OnnxRuntimeBackend, val: dict[str, np.ndarray]
) -> None:
    x = val["input"][:32]
    raw = ort.InferenceSession(str(EDGE_ONNX), providers=["CPUExecutionProvider"])
    want = raw.run(["logits"], {"input": x})[0]
    got = backend.infer({"input": x})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    acc = float(
        np.mean(backend.infer({"input": val["input"]})["logits"].argmax(1) == val["labels"])
    )
    assert acc > 0.9
    assert backend.manifest is not None
    assert backend.manifest.name == "digits_edge"
    assert backend.variant is not None
    assert backend.variant.name == "fp32"
    assert backend.active_providers == ["CPUExecutionProvider"]
    assert backend.session.get_session_options().intra_op_num_threads == 1


def test_tampered_model_file_is_refused(tmp_path: Path) -> None:
    pkg, pub = make_package(tmp_path / "p")
    f = pkg / "fp32.onnx"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"fp32\.onnx: sha256 differs"):
        load_backend(pkg, public_key=pub)


def test_tampered_manifest_is_refused(tmp_path: Path) -> None:
    pkg, pub = make_package(tmp_path / "p")
    m = pkg / "manifest.json"
    m.write_text(m.read_text().replace('"digits_edge"', '"digits_evil"'))
    with pytest.raises(SignatureError):
        load_backend(pkg, public_key=pub)


def test_package_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    pkg, _ = make_package(tmp_path / "p")
    _, other = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError):
        load_backend(pkg, public_key=other)


def test_unsigned_load_needs_explicit_opt_out(tmp_path: Path) -> None:
    pkg, _ = make_package(tmp_path / "p")
    with pytest.raises(SignatureError, match="no public key"):
        load_backend(pkg, public_key=None)
    b = load_backend(pkg, public_key=None, require_signature=False)
    assert b.infer({"input": np.zeros((1, 64), np.float32)})["logits"].shape == (1, 10)


def test_verified_modelpackage_is_accepted(tmp_path: Path) -> None:
    pkg, pub = make_package(tmp_path / "p")
    mp = verify_package(pkg, load_public_key(pub))
    b = load_backend(mp, public_key=None)
    assert b.manifest == mp.manifest


# -- variant choice ------------------------------------------------------------------------------

_ALL = {
    "fp32": ("fp32", "cpu"),
    "fp16": ("fp16", "gpu"),
    "int8": ("int8", "cpu"),
}


def _manifest(variants: dict[str, tuple[str, str]], trt: bool = False) -> Manifest:
    vs = [Variant(n, f"{n}.onnx", "onnx", p, t, 1, "0") for n, (p, t) in variants.items()]
    if trt:
        vs.insert(0, Variant("trt", "trt.engine", "tensorrt", "fp16", "gpu", 1, "0"))
    return Manifest(
        name="m",
        version="1",
        inputs=(TensorSpec("input", "float32", ("batch", 64)),),
        outputs=(TensorSpec("logits", "float32", ("batch", 10)),),
        variants=tuple(vs),
    )


CPU = ["CPUExecutionProvider"]
GPU = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("variants", "providers", "trt_ok", "want"),
    [
        (_ALL, CPU, False, "int8"),
        (_ALL, GPU, False, "int8"),
        ({"fp32": ("fp32", "cpu"), "fp16": ("fp16", "gpu")}, GPU, False, "fp16"),
        ({"fp32": ("fp32", "cpu"), "fp16": ("fp16", "gpu")}, CPU, False, "fp32"),
        ({"fp16": ("fp16", "any")}, CPU, False, "fp16"),
    ],
)
def test_auto_variant_choice(
    variants: dict[str, tuple[str, str]], providers: list[str], trt_ok: bool, want: str
) -> None:
    assert select_variant(_manifest(variants), providers=providers, trt_ok=trt_ok).name == want


def test_tensorrt_engine_preferred_only_when_it_runs_here() -> None:
    m = _manifest(_ALL, trt=True)
    assert select_variant(m, providers=GPU, trt_ok=True).name == "trt"
    assert select_variant(m, providers=GPU, trt_ok=False).name == "int8"
    # Here, without TensorRT, the lazy probe must say no rather than raise.
    assert select_variant(m, providers=CPU).name == "int8"


def test_only_gpu_variants_on_a_cpu_device_is_a_clear_error() -> None:
    m = _manifest({"fp16": ("fp16", "gpu")})
    with pytest.raises(PackageError, match=r"no variant runs on this device.*fp16"):
        select_variant(m, providers=CPU, trt_ok=False)


def test_explicit_variant_by_name_or_precision() -> None:
    m = _manifest(_ALL)
    assert select_variant(m, "fp16", providers=CPU).name == "fp16"
    assert select_variant(m, "int8").name == "int8"
    with pytest.raises(PackageError, match=r"cannot pick variant 'bf16'.*fp32 \(fp32, onnx\)"):
        select_variant(m, "bf16")


def test_load_explicit_variant(tmp_path: Path) -> None:
    pkg, pub = make_package(
        tmp_path / "p", variants={"fp32": ("fp32", "cpu"), "int8": ("int8", "cpu")}
    )
    assert load_backend(pkg, public_key=pub).variant.name == "int8"  # type: ignore[union-attr]
    b = load_backend(pkg, public_key=pub, variant="fp32")
    assert b.variant is not None
    assert b.variant.name == "fp32"


# -- providers -----------------------------------------------------------------------------------


def test_provider_preference_and_cpu_fallback() -> None:
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(None, avail) == avail
    assert choose_providers(None, ["AzureExecutionProvider", "CPUExecutionProvider"]) == CPU
    assert choose_providers(["CUDAExecutionProvider"], avail) == GPU


def test_configured_provider_missing_is_an_error_not_a_silent_cpu_run(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError, match=r"CUDAExecutionProvider.*not available"):
        choose_providers(["CUDAExecutionProvider"], CPU)
    pkg, pub = make_package(tmp_path / "p")
    with pytest.raises(BackendUnavailableError):
        load_backend(pkg, public_key=pub, providers=["CUDAExecutionProvider"])


def test_bad_thread_count_is_config_error(edge_pkg: tuple[Path, Path]) -> None:
    pkg, pub = edge_pkg
    with pytest.raises(ConfigError, match="threads"):
        load_backend(pkg, public_key=pub, threads=-1)


def test_model_that_disagrees_with_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"differ from the manifest"):
        OnnxRuntimeBackend(
            EDGE_ONNX,
            (TensorSpec("pixels", "float32", ("batch", 64)),),
            (TensorSpec("logits", "float32", ("batch", 10)),),
        )


# -- input validation ----------------------------------------------------------------------------


def test_missing_and_unknown_inputs_are_named(backend: OnnxRuntimeBackend) -> None:
    with pytest.raises(InputError, match=r"missing input\(s\) \['input'\].*expects \['input'\]"):
        backend.infer({})
    with pytest.raises(InputError, match=r"unknown input\(s\) \['pixels'\]") as e:
        backend.infer({"input": np.zeros((1, 64), np.float32), "pixels": 1})
    assert e.value.input_name == "pixels"
    with pytest.raises(InputError, match="mapping"):
        backend.infer(np.zeros((1, 64), np.float32))  # type: ignore[arg-type]


def test_wrong_rank_and_shape_are_named(backend: OnnxRuntimeBackend) -> None:
    with pytest.raises(
        ShapeError, match=r"input 'input': expected rank 2 \[batch, 64\], got rank 1"
    ):
        backend.infer({"input": np.zeros(64, np.float32)})
    with pytest.raises(
        ShapeError, match=r"expected shape \[batch, 64\], got \[2, 63\] \(dim 1 must be 64\)"
    ) as e:
        backend.infer({"input": np.zeros((2, 63), np.float32)})
    assert e.value.input_name == "input"
    # symbolic batch dim accepts any size
    assert backend.infer({"input": np.zeros((7, 64), np.float32)})["logits"].shape == (7, 10)


def test_dtype_policy(edge_pkg: tuple[Path, Path]) -> None:
    pkg, pub = edge_pkg
    strict = load_backend(pkg, public_key=pub)
    with pytest.raises(DTypeError, match=r"expected dtype float32, got float64 \(set allow_cast"):
        strict.infer({"input": np.zeros((1, 64), np.float64)})
    with pytest.raises(DTypeError, match="got uint8"):
        strict.infer({"input": np.zeros((1, 64), np.uint8)})
    ints = load_backend(pkg, public_key=pub, policy=InputPolicy(allow_int_to_float=True))
    assert ints.infer({"input": np.ones((1, 64), np.uint8)})["logits"].shape == (1, 10)
    with pytest.raises(DTypeError):
        ints.infer({"input": np.zeros((1, 64), np.float64)})
    cast = load_backend(pkg, public_key=pub, policy=InputPolicy(allow_cast=True))
    x = np.random.default_rng(0).random((1, 64))
    np.testing.assert_allclose(
        cast.infer({"input": x})["logits"],
        strict.infer({"input": x.astype(np.float32)})["logits"],
        rtol=1e-6,
    )
    # a Python list is read as an array, then held to the same dtype rule
    assert cast.infer({"input": [[0.0] * 64]})["logits"].shape == (1, 10)
    with pytest.raises(DTypeError):
        strict.infer({"input": [[0.0] * 64]})


def test_nonfinite_policy(edge_pkg: tuple[Path, Path], backend: OnnxRuntimeBackend) -> None:
    x = np.zeros((2, 64), np.float32)
    x[1, 5] = np.nan
    with pytest.raises(
        NonFiniteError, match=r"input 'input': 1 NaN/Inf value\(s\) \(first at index \(1, 5\)\)"
    ):
        backend.infer({"input": x})
    x[1, 5] = np.inf
    with pytest.raises(NonFiniteError):
        backend.infer({"input": x})
    # finite values whose sum overflows are not NaN/Inf
    big = np.full((1, 64), 3e38, np.float32)
    assert backend.infer({"input": big})["logits"].shape == (1, 10)
    pkg, pub = edge_pkg
    lax = load_backend(pkg, public_key=pub, policy=InputPolicy(nonfinite="allow"))
    assert lax.infer({"input": x})["logits"].shape == (2, 10)
    with pytest.raises(ConfigError, match="nonfinite"):
        InputPolicy(nonfinite="zero")  # type: ignore[arg-type]


def test_closed_backend_refuses(edge_pkg: tuple[Path, Path]) -> None:
    pkg, pub = edge_pkg
    b = load_backend(pkg, public_key=pub)
    with b:
        pass
    with pytest.raises(Exception, match="closed"):
        b.infer({"input": np.zeros((1, 64), np.float32)})


# -- TensorRT ------------------------------------------------------------------------------------


def test_tensorrt_backend_missing_library_names_the_extra() -> None:
    from edgecloud.deps import available
    from edgecloud.runtime.tensorrt import TensorRTBackend, engine_matches

    if available("tensorrt"):
        pytest.skip("TensorRT is installed here")
    spec = (TensorSpec("input", "float32", ("batch", 64)),)
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgecloud\[trt\]'"):
        TensorRTBackend("model.engine", spec, spec)
    ok, why = engine_matches(Variant("t", "t.engine", "tensorrt", "fp16", "gpu", 1, "0"))
    assert not ok
    assert "edgecloud[trt]" in why


def test_tensorrt_variant_without_tensorrt_fails_clearly_when_forced(tmp_path: Path) -> None:
    from edgecloud.deps import available

    if available("tensorrt"):
        pytest.skip("TensorRT is installed here")
    _, pub = make_package(tmp_path / "p")
    # Rewrite as a package whose only variant is an engine (the bytes do not matter here).
    m = Manifest(
        name="digits_edge",
        version="1",
        inputs=(TensorSpec("input", "float32", ("batch", 64)),),
        outputs=(TensorSpec("logits", "float32", ("batch", 10)),),
        variants=(Variant("trt", "model.engine", "tensorrt", "fp16", "gpu", 0, ""),),
    )
    priv = tmp_path / "p.key"
    write_package(
        tmp_path / "e", m, {"model.engine": EDGE_ONNX}, signing_key=load_private_key(priv)
    )
    with pytest.raises(MissingDependencyError, match=r"edgecloud\[trt\]"):
        load_backend(tmp_path / "e", public_key=pub, variant="trt")
    with pytest.raises(PackageError, match="no variant runs on this device"):
        load_backend(tmp_path / "e", public_key=pub)


@pytest.mark.gpu
def test_tensorrt_engine_runs_and_matches_onnxruntime(tmp_path: Path) -> None:  # pragma: no cover
    """On a GPU machine: build an engine from the edge model and compare with onnxruntime."""
    trt = pytest.importorskip("tensorrt")
    from edgecloud.runtime.tensorrt import TensorRTBackend

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(EDGE_ONNX.read_bytes())
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 64), (8, 64), (64, 64))
    config.add_optimization_profile(profile)
    engine = tmp_path / "edge.engine"
    engine.write_bytes(bytes(builder.build_serialized_network(network, config)))
    spec_in = (TensorSpec("input", "float32", ("batch", 64)),)
    spec_out = (TensorSpec("logits", "float32", ("batch", 10)),)
    b = TensorRTBackend(engine, spec_in, spec_out)
    x = np.load(SAMPLES / "data" / "edge_val.npz")["input"][:8]
    want = ort.InferenceSession(str(EDGE_ONNX)).run(["logits"], {"input": x})[0]
    np.testing.assert_allclose(b.infer({"input": x})["logits"], want, rtol=1e-3, atol=1e-3)
    with pytest.raises(ShapeError):
        b.infer({"input": np.zeros((1, 63), np.float32)})
    b.close()


def test_onnxruntime_errors_are_translated(tmp_path: Path, backend: OnnxRuntimeBackend) -> None:
    from edgecloud.errors import RuntimeBackendError

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    spec = (TensorSpec("input", "float32", ("batch", 64)),)
    with pytest.raises(RuntimeBackendError, match=r"onnxruntime could not load garbage\.onnx") as e:
        OnnxRuntimeBackend(garbage, spec, spec)
    assert e.value.__cause__ is not None
    # run_validated trusts its caller; a wrong shape past validation still surfaces translated
    with pytest.raises(RuntimeBackendError, match=r"onnxruntime failed on fp32\.onnx") as e:
        backend.run_validated({"input": np.zeros((1, 3), np.float32)})
    assert e.value.__cause__ is not None
