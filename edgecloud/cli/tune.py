"""``edgecloud tune``: calibrate an edge package and set its threshold from a target.

    edgecloud tune PACKAGE --data val.npz --cloud cloud.onnx --public-key pub --key priv
        --target offload=0.2 --target accuracy=0.5pt --target conformal=0.05 [--use 1]
        --out PACKAGE-tuned [--plot curve.png] [--json]

The data file holds the edge inputs (by input name, or ``input``) and ``labels``; the cloud side
is an ONNX file (``--cloud``, fed ``--cloud-data`` or the same inputs reshaped by
``--cloud-input-shape``) or a live region (``--region URL --cloud-model NAME``). Writes a new
signed version with the temperature, the chosen threshold and the curve in ``routing``
(docs/routing.md, "Calibration and tune"). Exit 1 when a variant regresses (needs more offload
than FP32 for the same target) and ``--fail-on-regression`` is given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgecloud.errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser("tune", help="calibrate confidence and pick the threshold from a target")
    p.add_argument("package", type=Path, help="signed edge package")
    p.add_argument("--data", required=True, type=Path, help="labelled validation rows (.npz)")
    p.add_argument("--cloud", type=Path, help="cloud model as an ONNX file")
    p.add_argument("--cloud-data", type=Path, help="cloud inputs (.npz) when laid out otherwise")
    p.add_argument(
        "--cloud-input-shape", help="reshape every input to [batch, ...] for the cloud: 1,8,8"
    )
    p.add_argument("--region", help="cloud region endpoint (http://... or mqtt://...)")
    p.add_argument("--cloud-model", help="model name at the region (default: the manifest's)")
    p.add_argument("--public-key", required=True, type=Path, help="key the package is signed by")
    p.add_argument("--key", required=True, type=Path, help="private key to sign the new version")
    p.add_argument("--out", required=True, type=Path, help="folder for the new package")
    p.add_argument("--version", help="new version (default: <version>-tuned)")
    p.add_argument(
        "--target",
        action="append",
        default=[],
        help="offload=0.2 | accuracy=0.5pt | conformal=0.05 | selective=0.02[,delta=0.1] "
        "(repeatable; default offload=0.2)",
    )
    p.add_argument("--use", type=int, default=0, help="which --target goes live (0-based)")
    p.add_argument(
        "--measure", default="max_probability", choices=("max_probability", "margin", "entropy")
    )
    p.add_argument("--variant", default="auto", help="variant to tune (default: what loads here)")
    p.add_argument("--fit-fraction", type=float, default=0.5, help="rows for the temperature fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--vector",
        action="store_true",
        help="also try per-class vector scaling; kept only if it beats the temperature",
    )
    p.add_argument("--plot", type=Path, help="write accuracy vs offload here (PNG, matplotlib)")
    p.add_argument("--fail-on-regression", action="store_true")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgecloud import calibration as cal
    from edgecloud import tuning
    from edgecloud.package import load_private_key, load_public_key, read_manifest

    targets = [cal.parse_target(t) for t in (args.target or ["offload=0.2"])]
    if (args.cloud is None) == (args.region is None):
        raise ConfigError("give exactly one of --cloud MODEL.onnx or --region URL")
    shape = None
    if args.cloud_input_shape:
        try:
            shape = [int(s) for s in args.cloud_input_shape.replace("x", ",").split(",")]
        except ValueError:
            raise ConfigError(
                f"--cloud-input-shape {args.cloud_input_shape!r}: expected ints like 1,8,8"
            ) from None
    manifest = read_manifest(args.package)
    names = [t.name for t in manifest.inputs]
    inputs, labels = tuning.load_rows(args.data, names)
    cloud_inputs = None
    if args.cloud_data is not None:
        cloud_inputs, clabels = tuning.load_rows(args.cloud_data, ["input"])
        if len(clabels) != len(labels) or (clabels != labels).any():
            raise ConfigError(f"{args.cloud_data}: labels differ from {args.data}'s")
    close = None
    if args.cloud is not None:
        cloud = tuning.cloud_from_onnx(args.cloud)
    else:
        cloud, close = tuning.cloud_from_region(
            args.region, model=args.cloud_model or manifest.name
        )
    try:
        res, written = tuning.tune_package(
            args.package,
            args.out,
            public_key=load_public_key(args.public_key),
            signing_key=load_private_key(args.key),
            inputs=inputs,
            labels=labels,
            cloud=cloud,
            targets=targets,
            use=args.use,
            measure=args.measure,
            version=args.version,
            cloud_inputs=cloud_inputs,
            cloud_input_shape=shape,
            variant=args.variant,
            fit_fraction=args.fit_fraction,
            seed=args.seed,
            force=args.force,
            vector=args.vector,
        )
    finally:
        if close is not None:
            close()
    if args.plot is not None:
        plot(res, args.plot)
    regressions = [n for n, r in res.variants.items() if r.get("regression")]
    if args.json:
        print(
            json.dumps(
                {
                    "package": str(args.out),
                    "version": written.version,
                    "routing": written.routing,
                    "regressions": regressions,
                },
                indent=2,
            )
        )
    else:
        _print(res, written, regressions)
    return 1 if regressions and args.fail_on_regression else 0


def _print(res: Any, written: Any, regressions: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.print(
        f"[bold]{written.name} {written.version}[/]: temperature {res.temperature:.3f}, "
        f"ECE {res.ece_before:.4f} -> {res.ece_after:.4f} "
        f"(rows: {res.n_fit} fit, {res.n_threshold} threshold); edge {res.edge_accuracy:.2%}, "
        f"cloud {res.cloud_accuracy:.2%}"
    )
    t = Table(title="targets (on the threshold split)")
    for col in ("", "target", "threshold", "offload", "accuracy"):
        t.add_column(col)
    for r in res.targets:
        live = "*" if r is res.chosen else ""
        t.add_row(
            live, r.target.describe(), f"{r.threshold:.4f}", f"{r.offload:.1%}", f"{r.accuracy:.2%}"
        )
    c.print(t)
    if res.variants:
        v = Table(title=f"variants for: {res.chosen.target.describe()}")
        for col in ("variant", "precision", "offload", "accuracy", "regression"):
            v.add_column(col)
        for name, row in res.variants.items():
            if "error" in row:
                v.add_row(name, "", "", "", row["error"])
                continue
            v.add_row(
                name,
                row["precision"],
                f"{row['offload']:.1%}",
                f"{row['accuracy']:.2%}",
                "REGRESSION" if row.get("regression") else "",
            )
        c.print(v)
    if regressions:
        c.print(f"[red]regression:[/] {', '.join(regressions)} need more offload than FP32")


def plot(res: Any, path: Path) -> Path:
    """Accuracy vs offload, raw and calibrated, the targets' points marked."""
    from edgecloud.deps import require

    require("matplotlib", "dev", "tune --plot draws with matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for curve, label in ((res.curve_raw, "raw"), (res.curve_calibrated, "calibrated")):
        ax.plot(curve.offload * 100, curve.accuracy * 100, label=f"{label} confidence")
    ax.axhline(res.cloud_accuracy * 100, ls="--", c="grey", label="cloud only")
    for r in res.targets:
        ax.scatter([r.offload * 100], [r.accuracy * 100], zorder=3)
        ax.annotate(f"{r.target.kind} (t={r.threshold:.3f})", (r.offload * 100, r.accuracy * 100))
    ax.set_xlabel("offloaded (%)")
    ax.set_ylabel("accuracy (%)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
