"""``edgecloud demo``: the whole product on one machine, with nothing to install by hand.

It shows what a team gets, with real parts only: the sample edge model (an MLP trained on
scikit-learn's digits) is converted into a signed package; two cloud regions start on loopback
serving the larger CNN (the second one with an explicit *simulated* extra latency, because every
process here is equally near); when Mosquitto is installed a broker starts too and the near region
is reached over MQTT, otherwise both over HTTP, and the demo says which. The held-out digits then go
through ``HybridClient``; the near region is stopped mid-run to show failover, then both to show
degraded local answers. A threshold sweep is plotted to a PNG.

When Mosquitto is installed the demo also runs ``edgecloud fleet serve`` with its console (in
its own process, with its own broker, so the demo's MQTT region is not involved) and the demo's
client reports to it as a device agent would; the console's URL is printed first, and with
``--keep-console`` (the default at a terminal) it stays up after the demo until Enter is pressed.
The console is optional: if it cannot start, the demo says so and runs without it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgecloud.cli.demo_services import (
    SAMPLES,
    _free_port,
    _mosquitto,
    _Procs,
    _services,
    _wait_port,
)
from edgecloud.cli.demo_sweep import _drive, _pct, _plot, _sweep
from edgecloud.errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the end-to-end hybrid inference demo")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="work folder (replaced)")
    p.add_argument("--threshold", type=float, default=0.8, help="edge confidence threshold")
    p.add_argument(
        "--far-latency-ms", type=float, default=40.0, help="simulated extra latency of region 2"
    )
    p.add_argument("--no-mqtt", action="store_true", help="reach the cloud over HTTP only")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-console", action="store_true", help="run without the fleet console")
    p.add_argument(
        "--console-port", type=int, default=0, help="the console's port (default: a free one)"
    )
    p.add_argument(
        "--keep-console",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the console up after the demo until Enter (default: at a terminal)",
    )
    p.set_defaults(func=_run)


# -- the demo ----------------------------------------------------------------------------------


def _open_console(args: argparse.Namespace, out: Path, console: Any) -> tuple[Any, Any]:
    """(DemoConsole, its processes) or (None, None): the console never fails the demo.

    The controller is ``edgecloud fleet serve`` in its own process with its own Mosquitto, so
    the console costs the demo's requests no CPU time and works with ``--no-mqtt`` too.
    """
    if args.no_console:
        return None, None
    binary = _mosquitto()
    if binary is None:
        console.print(
            "[yellow]fleet console: off (it needs Mosquitto for the controller; "
            "install Debian's mosquitto)[/yellow]"
        )
        return None, None
    procs = _Procs()
    try:
        from edgecloud.cli._demo_console import DemoConsole

        http_port = args.console_port or _free_port()
        with socket.socket() as probe:  # a taken port would look "listening" to _wait_port
            try:
                probe.bind(("127.0.0.1", http_port))
            except OSError as exc:
                raise ConfigError(
                    f"--console-port: 127.0.0.1:{http_port} is taken ({exc})"
                ) from exc
        logs = out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        fleet = out / "fleet"
        fleet.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        conf = out / "fleet-mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
            "persistence false\nlog_dest stderr\nlog_type error\n"
        )
        b = procs.start("fleet-mosquitto", [binary, "-c", str(conf)], logs)
        _wait_port(b, port, timeout=10)
        broker = f"mqtt://127.0.0.1:{port}"
        serve = [sys.executable, "-m", "edgecloud", "fleet", "serve", "--broker", broker]
        serve += ["--db", str(fleet / "fleet.sqlite"), "--packages", str(fleet / "packages")]
        serve += ["--http-port", str(http_port)]
        ctl = procs.start("fleet-controller", serve, logs)
        _wait_port(ctl, http_port, timeout=30)
        dc = DemoConsole(broker, f"http://127.0.0.1:{http_port}")
        dc.wait_ready()
    except Exception as exc:
        procs.stop_all()
        console.print(f"[yellow]fleet console: off ({type(exc).__name__}: {exc})[/yellow]")
        return None, None
    console.print(
        f"[bold]fleet console:[/bold] {dc.url}  (the demo's device and its routing, live)"
    )
    return dc, procs


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=args.json)
    _check_args(args)
    out: Path = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    dc, procs = _open_console(args, out, console)
    try:
        code = _demo(args, out, console, dc)
        keep = args.keep_console
        if keep is None:
            keep = sys.stdin.isatty() and not args.json
        if dc is not None and keep:
            console.print(
                f"\nthe fleet console stays up at [bold]{dc.url}[/bold]; press Enter to stop"
            )
            with contextlib.suppress(KeyboardInterrupt, EOFError):
                input()
        return code
    finally:
        if dc is not None:
            dc.close()
        if procs is not None:
            procs.stop_all()


def _check_args(args: argparse.Namespace) -> None:
    models = SAMPLES / "models"
    if not (models / "digits_edge.onnx").exists():
        raise ConfigError(
            f"sample models not found under {models}; run `python samples/train_digits.py` "
            "from a source checkout first"
        )
    if not 0.0 < args.threshold < 1.0:
        raise ConfigError(f"--threshold must be in (0, 1), got {args.threshold}")


def _demo(args: argparse.Namespace, out: Path, console: Any, dc: Any) -> int:
    from rich.table import Table

    models = SAMPLES / "models"
    data = SAMPLES / "data"
    use_mqtt = not args.no_mqtt and _mosquitto() is not None
    report: dict[str, Any] = {"threshold": args.threshold}

    # 1. Convert the edge model into a signed package.
    from converters import ConvertOptions, convert
    from edgecloud.package import generate_keypair

    console.rule("[bold]1. convert the edge model into a signed package")
    key, pub = generate_keypair(out / "keys" / "fleet")
    conv = convert(
        models / "digits_edge.onnx",
        out / "digits_edge.pkg",
        ConvertOptions(
            name="digits_edge",
            version="1",
            int8=("static",),
            fp16=True,
            calib=data / "edge_calib.npz",
            val=data / "edge_val.npz",
            tolerance=1.0,
            sign=key,
            labels=tuple(str(i) for i in range(10)),
            confidence="logits",
            latency_runs=300,
        ),
    )
    vt = Table("variant", "bytes", "vs fp32", "b1 speed", "verdict", "gate vs fp32")
    conv_rows = []
    for v in conv.variants:
        g = v.gate
        why = (
            ""
            if g is None
            else g.reason
            if not g.passed and g.reason
            else f"{g.metric} {g.value:.4f} (-{g.drop_pct:.2f} %)"
        )
        vt.add_row(
            v.name,
            f"{v.size:,}",
            f"{v.size_ratio:.2f}",
            f"{v.speedup_b1:.2f}x" if v.speedup_b1 else "-",
            v.verdict,
            why[:70],
        )
        conv_rows.append(v.to_dict())
    console.print(vt)
    report["conversion"] = conv_rows

    val = np.load(data / "edge_val.npz")
    xs, ys = val["input"].astype(np.float32), val["labels"].astype(np.int64)
    report["samples"] = len(ys)

    # The device's client: the SDK's HybridClient as the device agent runs it, which counts every
    # answer for telemetry (what the fleet console plots).
    from device_agent.serving import AgentClient

    console.rule("[bold]2. start two cloud regions on loopback")
    with _services(out, use_mqtt, args.far_latency_ms) as svc:
        near_url = svc["procs"]["near"][1]
        far_url = svc["procs"]["far"][1]
        if svc["mqtt"]:
            near_endpoint = svc["mqtt"]
            console.print(
                f"broker: Mosquitto at {svc['mqtt']}; region [b]near[/b] is reached over "
                "MQTT 5 (request/response with shared-subscription workers)"
            )
            near_opts: dict[str, Any] = {"device_id": "demo-device"}
        else:
            near_endpoint = near_url
            near_opts = {}
            console.print(
                "[yellow]Mosquitto is not installed: the demo uses HTTP only "
                "(install Debian's mosquitto for the MQTT path)[/yellow]"
            )
        console.print(
            f"region [b]near[/b]: {near_endpoint}   region [b]far[/b]: {far_url} "
            f"(+{args.far_latency_ms:.0f} ms simulated distance)"
        )
        report["regions"] = {
            "near": near_endpoint,
            "far": far_url,
            "far_simulated_latency_ms": args.far_latency_ms,
            "transport_near": "mqtt" if svc["mqtt"] else "http",
        }
        regions = [
            {
                "name": "near",
                "endpoint": near_endpoint,
                "model": "digits_cloud",
                "cloud_input_shape": [1, 8, 8],
                "options": near_opts,
                # Per-attempt timeouts leave time in the 2 s deadline for the next region.
                "timeout": 0.5,
            },
            {
                "name": "far",
                "endpoint": far_url,
                "model": "digits_cloud",
                "cloud_input_shape": [1, 8, 8],
                "timeout": 1.0,
            },
        ]
        from edgecloud.package import load_public_key

        with AgentClient(
            package=out / "digits_edge.pkg",
            public_key=load_public_key(pub),
            regions=regions,
            threshold=args.threshold,
            deadline=2.0,
            probe_interval=0.5,
            failure_threshold=2,
            cooldown=30.0,
        ) as client:
            loaded = getattr(client.backend, "loaded", None)
            chosen = loaded.variant.name if loaded is not None else "?"
            report["edge_variant"] = chosen
            why = (
                "the converter measured INT8 slower than FP32 on this CPU for a model this small"
                if chosen == "fp32" and any(r["precision"] == "int8" for r in conv_rows)
                else "automatic choice"
            )
            console.print(f"the device loaded variant [b]{chosen}[/b] ({why})")
            if dc is not None:
                try:
                    dc.attach(client, "digits_edge", "1")
                except Exception as exc:  # the console is optional
                    console.print(f"[yellow]fleet console: the device cannot report ({exc})")
                    dc = None
            # Let the probes measure both regions' round trips first, so "nearest" means something.
            time.sleep(1.5)
            console.rule("[bold]3. held-out digits: edge only, cloud only, hybrid")
            edge = _drive(client, xs, ys, mode="edge_only")
            cloud = _drive(client, xs, ys, mode="cloud_only")
            hybrid = _drive(client, xs, ys)
            t = Table("path", "accuracy", "offloaded", "p50 ms", "p95 ms", "served by")
            for label, run in (("edge only", edge), ("cloud only", cloud), ("hybrid", hybrid)):
                all_lat = [v for vs in run.latency.values() for v in vs]
                t.add_row(
                    label,
                    f"{100 * run.accuracy:.2f} %",
                    f"{100 * run.offloaded:.1f} %",
                    f"{_pct(all_lat, 50):.2f}",
                    f"{_pct(all_lat, 95):.2f}",
                    ", ".join(f"{k}={v}" for k, v in sorted(run.sources.items())),
                )
            console.print(t)
            lt = Table("hybrid path", "requests", "p50 ms", "p95 ms")
            for src, lat in sorted(hybrid.latency.items()):
                lt.add_row(src, str(len(lat)), f"{_pct(lat, 50):.2f}", f"{_pct(lat, 95):.2f}")
            console.print(lt)
            report["edge_only"] = edge.summary()
            report["cloud_only"] = cloud.summary()
            report["hybrid"] = hybrid.summary()

            console.rule("[bold]4. failover: stop the near region mid-run")
            half = len(ys) // 2
            before = _drive(client, xs[:half], ys[:half])
            svc["procs"]["near"][0].stop()
            # Over MQTT the broker stays up: the near region's workers died with its server, so
            # its requests time out until its breaker opens, and the far region answers.
            after = _drive(client, xs[half:], ys[half:])
            ft = Table("phase", "accuracy", "served by", "degraded", "errors")
            for label, run in (("near up", before), ("near stopped", after)):
                ft.add_row(
                    label,
                    f"{100 * run.accuracy:.2f} %",
                    ", ".join(f"{k}={v}" for k, v in sorted(run.sources.items())),
                    str(run.degraded),
                    str(run.errors),
                )
            console.print(ft)
            report["failover"] = {"before": before.summary(), "after": after.summary()}

            console.rule("[bold]5. all regions down: degraded local answers, no exceptions")
            svc["procs"]["far"][0].stop()
            down = _drive(client, xs, ys)
            console.print(
                f"accuracy {100 * down.accuracy:.2f} %, degraded {down.degraded}/{down.total} "
                f"(reasons {dict(down.reasons)}), exceptions raised: {down.errors}"
            )
            report["all_down"] = down.summary()
            if dc is not None:
                try:  # what the console shows now, through the API it calls
                    dc.heartbeat()
                    dc.wait_seen(dc.sent)  # the controller has every heartbeat
                    report["console"] = dc.snapshot()
                except Exception as exc:
                    console.print(f"[yellow]fleet console: no snapshot ({exc})[/yellow]")

            # Threshold sweep from the edge logits and the cloud model's answers.
            edge_logits = np.concatenate(
                [
                    client.infer({"input": xs[i : i + 64]}, mode="edge_only").outputs["logits"]
                    for i in range(0, len(xs), 64)
                ]
            )
    import onnxruntime as ort

    sess = ort.InferenceSession(
        str(models / "digits_cloud.onnx"), providers=["CPUExecutionProvider"]
    )
    cloud_pred = sess.run(None, {"input": xs.reshape(-1, 1, 8, 8)})[0].argmax(axis=1)
    rows = _sweep(edge_logits, cloud_pred, ys)
    report["sweep"] = rows
    st = Table("threshold", "hybrid accuracy", "offloaded")
    for r in rows:
        st.add_row(
            f"{r['threshold']:.3f}", f"{100 * r['accuracy']:.2f} %", f"{100 * r['offloaded']:.1f} %"
        )
    console.rule("[bold]6. threshold sweep")
    console.print(st)
    png = out / "threshold_sweep.png"
    if _plot(rows, report["edge_only"]["accuracy"], report["cloud_only"]["accuracy"], png):
        console.print(f"plot: {png}")
        report["plot"] = str(png)
    (out / "demo_report.json").write_text(json.dumps(report, indent=2, default=str))
    console.print(f"report: {out / 'demo_report.json'}")
    if args.json:
        print(json.dumps(report, default=str))
    return 0
