"""Calibration and tuned thresholds: digits and a harder pair (samples/build_hard_pair.py).

For each task: the temperature ``edgecloud tune`` fits and the ECE before/after on held-out rows;
accuracy vs offload for raw and calibrated confidence; what a fixed threshold of 0.9 means
before and after (the accuracy of the answers the edge keeps); then the thresholds ``tune``
picks on the tune split for three targets and what they achieve on the held-out split:

- ``offload=X``: held-out offload within 2 points of X;
- ``accuracy=Y``: held-out hybrid accuracy within Y of cloud-only (+ sampling slack, printed);
- ``conformal=alpha``: held-out coverage ``1 - P(edge answers wrongly)`` vs ``1 - alpha``, on the
  split and averaged over 500 random re-splits of the same rows (the guarantee is in
  expectation over the calibration draw, so the average is what must be >= 1 - alpha).

The same ``edgecloud.tuning.tune`` that the CLI calls does the fitting and picking; the routing
decision is a pure function of the edge outputs, so in-process scoring is exact (cascade.py
checks that against HybridClient end to end).

    python -m benchmarks.calibration [--quick] [--plot DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


FAILED: list[str] = []
#: Share of the tune rows for the temperature (one parameter needs few); the rest pick thresholds.
FIT_FRACTION = 0.3
#: Cross-fitting (``cross_fit``): folds, and fold assignments tried.
CROSS_FOLDS = 5
CROSS_REPEATS = 10


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(s.run(None, {s.get_inputs()[0].name: x})[0], dtype=np.float64)


def digits() -> dict[str, Any]:
    """The sample pair on its 560 non-training rows (calib + val), re-split 60/40 (seeded):
    the calibration split alone (200) leaves too few rows for a 10 % quantile."""
    m = SAMPLES / "models"
    e = [np.load(SAMPLES / "data" / f"edge_{s}.npz") for s in ("calib", "val")]
    c = [np.load(SAMPLES / "data" / f"cloud_{s}.npz") for s in ("calib", "val")]
    logits = _run(m / "digits_edge.onnx", np.concatenate([d["input"] for d in e]))
    cloud = _run(m / "digits_cloud.onnx", np.concatenate([d["input"] for d in c])).argmax(1)
    labels = np.concatenate([d["labels"] for d in e])
    perm = np.random.default_rng(0).permutation(len(labels))
    k = int(0.6 * len(labels))
    out: dict[str, Any] = {"name": "digits (edge MLP 64->16->10 vs cloud CNN)"}
    for key, idx in (("tune", perm[:k]), ("test", perm[k:])):
        out[key] = (logits[idx], cloud[idx], labels[idx])
    return out


def hard(work: Path) -> dict[str, Any]:
    """samples/build_hard_pair.py, built now into ``work``."""
    from samples.build_hard_pair import build

    meta = build(work)
    out: dict[str, Any] = {"name": f"hard digits ({meta['edge']} vs {meta['cloud']})", "work": work}
    for key in ("tune", "test"):
        z = np.load(work / f"{key}.npz")
        out[key] = (
            _run(work / "edge.onnx", z["input"]),
            _run(work / "cloud.onnx", z["input"]).argmax(1),
            z["labels"],
        )
    return out


def cross_fit(
    name: str,
    logits: np.ndarray,
    cloud: np.ndarray,
    labels: np.ndarray,
    targets: list[Any],
    folds: int = CROSS_FOLDS,
    repeats: int = CROSS_REPEATS,
) -> bool:
    """Every row held out once: ``tune`` on the other folds, its thresholds applied to the fold.

    One 40 % split of the digits rows holds 224 rows, whose own offload fraction near 10 % has a
    sampling s.e. of 2 points: a single split cannot tell a rule that meets "within 2 points"
    from one that does not. Cross-fitting decides every row with a threshold that never saw it,
    so all pooled rows count as held out (what a device sees: rows the tune step never saw), and
    the repeats show how much the fold assignment moves the result. The offload check (within 2
    points) and the accuracy check (within the bound, one s.e. of slack) are made on these.
    """
    from edgecloud import calibration as cal
    from edgecloud.tuning import tune

    n = len(labels)
    off = np.zeros((repeats, len(targets)))
    acc = np.zeros((repeats, len(targets)))
    cov = np.zeros((repeats, len(targets)))
    for rep in range(repeats):
        fold = np.random.default_rng(100 + rep).permutation(n) % folds
        offloaded = np.zeros((len(targets), n), dtype=bool)
        for k in range(folds):
            tr, te = fold != k, fold == k
            res = tune(
                logits[tr], cloud[tr], labels[tr], targets=targets,
                fit_fraction=FIT_FRACTION, seed=rep,
            )  # fmt: skip
            conf = cal.softmax(logits[te], res.temperature).max(1)
            for j, r in enumerate(res.targets):
                offloaded[j, te] = conf < r.threshold
        edge_ok = cal.softmax(logits).argmax(1) == labels
        cloud_ok = cloud == labels
        for j in range(len(targets)):
            off[rep, j] = offloaded[j].mean()
            acc[rep, j] = np.where(offloaded[j], cloud_ok, edge_ok).mean()
            cov[rep, j] = 1.0 - (~offloaded[j] & ~edge_ok).mean()
    ok = True
    print(f"  cross-fitted ({folds} folds x {repeats} repeats, all {n} rows held out once each):")
    for j, t in enumerate(targets):
        o, a = off[:, j], acc[:, j]
        line = (
            f"    {t.describe()}: held-out offload {o.mean():.3f} (repeats {o.min():.3f}-"
            f"{o.max():.3f}), hybrid accuracy {a.mean():.4f}"
        )
        if t.kind == "offload":
            good = abs(o.mean() - t.value) <= 0.02
            line += f"; within 2 pt of {t.value:.3f}: {good}"
            if not good:
                FAILED.append(f"{name[:12]}: cross-fitted offload {o.mean():.3f} vs {t.value}")
            ok &= good
        elif t.kind == "accuracy":
            floor = float((cloud == labels).mean()) - t.value
            se = float(np.sqrt(a.mean() * (1 - a.mean()) / n))
            good = a.mean() >= floor - se
            line += f"; vs cloud-only - bound {floor:.4f} (1 s.e. {se:.4f}): {good}"
            if not good:
                FAILED.append(f"{name[:12]}: cross-fitted accuracy {a.mean():.4f} < {floor:.4f}")
            ok &= good
        elif t.kind == "conformal":
            line += f"; coverage {cov[:, j].mean():.4f} vs 1 - alpha = {1 - t.value:.4f}"
        print(line)
    return ok


def report(task: dict[str, Any], targets: list[str], resplits: int, plot: Path | None) -> bool:
    from edgecloud import calibration as cal
    from edgecloud.tuning import tune

    le, cp, y = task["tune"]
    te, tc, ty = task["test"]
    tg = [cal.parse_target(t) for t in targets]
    res = tune(le, cp, y, targets=tg, fit_fraction=FIT_FRACTION, seed=0)
    T = res.temperature
    p_raw, p_cal = cal.softmax(te), cal.softmax(te, T)
    edge_ok, cloud_ok = p_raw.argmax(1) == ty, tc == ty
    conf_raw, conf_cal = p_raw.max(1), p_cal.max(1)
    print(f"\n## {task['name']}")
    print(
        f"rows: tune {len(y)} (temperature fit {res.n_fit}, thresholds {res.n_threshold}), "
        f"held out {len(ty)}"
    )
    print(f"held out: edge-only {edge_ok.mean():.4f}  cloud-only {cloud_ok.mean():.4f}")
    print(
        f"temperature {T:.3f}; held-out ECE {cal.ece(p_raw, ty):.4f} -> {cal.ece(p_cal, ty):.4f}, "
        f"NLL {cal.nll(te, ty):.4f} -> {cal.nll(te, ty, T):.4f}"
    )
    rv = tune(le, cp, y, targets=tg, fit_fraction=FIT_FRACTION, seed=0, vector=True)
    v = rv.candidates["vector"]
    fit_rows = np.random.default_rng(0).permutation(len(y))[: res.n_fit]
    scale, bias = cal.fit_vector(le[fit_rows], y[fit_rows])
    pv = cal.vector_probs(te, scale, bias)
    v_nll = float(-np.log(np.clip(pv[np.arange(len(ty)), ty], 1e-300, 1)).mean())
    print(
        f"vector scaling (tune --vector): threshold rows ECE {v['ece']:.4f} NLL {v['nll']:.4f} vs "
        f"temperature {rv.candidates['temperature']['ece']:.4f} / "
        f"{rv.candidates['temperature']['nll']:.4f} -> chosen: {rv.method}; held out ECE "
        f"{cal.ece_of(cal.vector_confidence(te, scale, bias), edge_ok):.4f}, NLL {v_nll:.4f}"
    )
    print("accuracy vs offload (held out), threshold picked for each offload level:")
    print("  offload   raw conf   calibrated")
    for x in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5):
        r = cal.hybrid(conf_raw, cal.pick_offload(conf_raw, x), edge_ok, cloud_ok)[0]
        c = cal.hybrid(conf_cal, cal.pick_offload(conf_cal, x), edge_ok, cloud_ok)[0]
        print(f"  {x:7.0%}   {r:.4f}     {c:.4f}")
    for name, conf in (("raw", conf_raw), ("calibrated", conf_cal)):
        kept = conf >= 0.9
        acc = edge_ok[kept].mean() if kept.any() else float("nan")
        print(
            f"fixed threshold 0.9 on {name:10s}: offload {1 - kept.mean():.3f}, accuracy of the "
            f"edge's own answers {acc:.4f} (a calibrated 0.9 should mean >= ~0.9)"
        )
    ok = True
    print("targets picked on the tune split -> held out:")
    for r in res.targets:
        acc, off = cal.hybrid(conf_cal, r.threshold, edge_ok, cloud_ok)
        answered = conf_cal >= r.threshold
        coverage = 1.0 - float((answered & ~edge_ok).mean())
        if r.target.kind == "offload":
            # one split of m rows: its own sampling error; judged on the cross-fit below
            se = float(np.sqrt(r.target.value * (1 - r.target.value) / len(ty)))
            good = True
            check = (
                f"offload {off:.3f} vs target {r.target.value:.3f} (this split's sampling "
                f"s.e. {se:.3f}; within 2 pt: {abs(off - r.target.value) <= 0.02})"
            )
        elif r.target.kind == "accuracy":
            # sampling slack: one binomial standard error of the held-out accuracy
            se = float(np.sqrt(acc * (1 - acc) / len(ty)))
            floor = float(cloud_ok.mean()) - r.target.value
            good = acc >= floor - se
            if not good:
                FAILED.append(f"{task['name'][:12]}: held-out accuracy {acc:.4f} < {floor:.4f}")
            check = (
                f"hybrid {acc:.4f} vs cloud-only - {r.target.value * 100:.2g} pt = {floor:.4f} "
                f"(1 s.e. = {se:.4f}; met: {good})"
            )
        else:
            good = True  # judged on the average over re-splits below
            check = f"coverage {coverage:.4f} vs 1 - alpha = {1 - r.target.value:.4f}"
        ok &= good
        print(
            f"  {r.target.describe()}: t = {r.threshold:.4f} (tune split: offload {r.offload:.3f}, "
            f"acc {r.accuracy:.4f}) -> held out offload {off:.3f}, acc {acc:.4f}; {check}"
        )
    # the offload target over re-splits of the same rows: how much of a miss is sampling noise
    logits = np.concatenate([le, te])
    labels = np.concatenate([y, ty])
    ok &= cross_fit(task["name"], logits, np.concatenate([cp, tc]), labels, tg)
    conf_all = cal.softmax(logits, T).max(1)
    for r in res.targets:
        if r.target.kind != "offload":
            continue
        x_t = r.target.value
        # the seed-0 split itself: where the held-out rows' own quantile lies, and what even a
        # threshold from the pooled rows (an oracle that saw the held-out rows) gives there
        pooled = cal.hd_quantile(conf_all, x_t)
        print(
            f"  offload diagnosis: held-out rows below the pooled {x_t:.0%} quantile "
            f"{float((conf_cal < pooled).mean()):.3f}; the held-out rows' own {x_t:.0%} quantile "
            f"{cal.hd_quantile(conf_cal, x_t):.4f} vs the tune rows' "
            f"{cal.hd_quantile(cal.softmax(le, T).max(1), x_t):.4f}"
        )
        # old method (one order statistic on the threshold rows) vs now (smoothed, every row)
        for label, n_rows, method in (
            ("before: order statistic, threshold rows", res.n_threshold, "order"),
            ("now: Harrell-Davis, every tune row", len(y), "hd"),
        ):
            rng = np.random.default_rng(2)
            dev = []
            for _ in range(resplits):
                perm = rng.permutation(len(labels))
                cal_i, test_i = perm[:n_rows], perm[len(y) :]
                c = conf_all[cal_i]
                if method == "order":
                    k = int(np.floor(x_t * (len(c) + 1) + 1e-9)) - 1
                    t = float(np.sort(c)[k]) if k >= 0 else 0.0
                else:
                    t = cal.pick_offload(c, x_t)
                dev.append(float((conf_all[test_i] < t).mean()) - x_t)
            d = np.abs(dev)
            print(
                f"  offload over {resplits} re-splits, {label} ({n_rows}): mean held-out "
                f"offload {x_t + np.mean(dev):.3f}, |miss| mean {d.mean():.3f}, within 2 pt in "
                f"{np.mean(d <= 0.02):.0%} of splits"
            )
    # conformal: the guarantee is marginal over the calibration draw; check it on re-splits
    for r in res.targets:
        if r.target.kind not in ("conformal", "selective"):
            continue
        a = r.target.value
        ok_all = cal.softmax(logits).argmax(1) == labels
        rng = np.random.default_rng(1)
        n_cal = res.n_threshold
        covs, sel_err = [], []
        for _ in range(resplits):
            perm = rng.permutation(len(labels))
            cal_i, test_i = perm[:n_cal], perm[n_cal:]
            pick = cal.conformal_threshold if r.target.kind == "conformal" else None
            if pick is not None:
                t = pick(conf_all[cal_i], ok_all[cal_i], a)
            else:
                t = cal.selective_threshold(conf_all[cal_i], ok_all[cal_i], a, r.target.delta)
            ans = conf_all[test_i] >= t
            covs.append(1.0 - float((ans & ~ok_all[test_i]).mean()))
            if ans.any():
                sel_err.append(float((~ok_all[test_i][ans]).mean()))
        mean = float(np.mean(covs))
        if r.target.kind == "conformal":
            good = mean >= 1 - a - 1e-9
            print(
                f"  split-conformal over {resplits} re-splits ({n_cal} calibration rows each): "
                f"mean coverage {mean:.4f} vs 1 - alpha = {1 - a:.4f} (met: {good}); "
                f"5th percentile {np.percentile(covs, 5):.4f}"
            )
        else:
            frac = float(np.mean(np.array(sel_err) > a)) if sel_err else 0.0
            good = frac <= r.target.delta + 0.05
            print(
                f"  selective over {resplits} re-splits: P(error among answered > {a}) = "
                f"{frac:.3f} vs delta {r.target.delta} (met: {good})"
            )
        ok &= good
    if plot is not None:
        from edgecloud.cli.tune import plot as draw

        plot.mkdir(parents=True, exist_ok=True)
        name = "digits" if task["name"].startswith("digits") else "hard"
        print(f"  plot: {draw(res, plot / f'{name}_tune.png')}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibration", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer conformal re-splits")
    parser.add_argument("--plot", type=Path, help="write tune's accuracy-vs-offload plots here")
    args = parser.parse_args(argv)
    resplits = 100 if args.quick else 500
    ok = report(digits(), ["offload=0.1", "accuracy=1pt", "conformal=0.05"], resplits, args.plot)
    with tempfile.TemporaryDirectory() as d:
        ok &= report(
            hard(Path(d)),
            ["offload=0.2", "accuracy=1pt", "conformal=0.05"],
            resplits,
            args.plot,
        )
    print(f"\nall checks met: {ok}" + ("" if ok else f" (missed: {'; '.join(FAILED)})"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
