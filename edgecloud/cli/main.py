"""The ``edgecloud`` command line.

Each command group lives in its own module, imported only when that command runs, so a broken or
missing extra (say, the cloud server's web stack on a device) turns one command into a clear error
instead of killing the whole CLI, and ``edgecloud --help`` stays fast.

Exit codes: 0 success; 1 the operation failed (validation refused a variant, verification failed,
a job failed); 2 bad usage or bad input; 3 a missing optional dependency; 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from edgecloud.errors import (
    ConfigError,
    DataError,
    EdgeCloudError,
    InputError,
    MissingDependencyError,
)

__all__ = ["COMMANDS", "EXIT_FAILED", "EXIT_MISSING_DEP", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_MISSING_DEP = 3

#: command name -> (module, one-line help). Each module defines ``register(subparsers)``, which
#: adds its parser and sets ``func`` (``Callable[[argparse.Namespace], int]``) as a default.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("edgecloud.cli.convert", "make validated FP16/INT8/TensorRT variants of a model"),
    "inspect-quant": ("edgecloud.cli.inspect_quant", "rank a model's nodes by INT8 sensitivity"),
    "tune": ("edgecloud.cli.tune", "calibrate confidence and pick the threshold from a target"),
    "keys": ("edgecloud.cli.keys", "generate Ed25519 signing keys"),
    "package": ("edgecloud.cli.package", "verify or inspect a model package"),
    "cloud": ("edgecloud.cli.cloud", "run a cloud region server (KServe V2 over HTTP/MQTT)"),
    "agent": ("edgecloud.cli.agent", "run the device agent"),
    "fleet": ("edgecloud.cli.fleet", "manage a fleet: devices, deployments, jobs, policy"),
    "demo": ("edgecloud.cli.demo", "run the end-to-end hybrid inference demo"),
    "bench": ("edgecloud.cli.bench", "run the benchmarks"),
}


def _broken(name: str, exc: BaseException) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        if isinstance(exc, MissingDependencyError):
            print(f"edgecloud {name}: {exc}", file=sys.stderr)
            return EXIT_MISSING_DEP
        print(f"edgecloud {name} is unavailable: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return EXIT_MISSING_DEP

    return run


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgecloud")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecloud", description=__doc__.splitlines()[0].replace("``", "")
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--version", action="version", version=f"edgecloud {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        if only is not None and name != only:
            # Still list every command in --help without importing its module.
            sub.add_parser(name, help=help_, add_help=False)
            continue
        try:
            mod = importlib.import_module(module)
            mod.register(sub)
        except ImportError as exc:
            p = sub.add_parser(name, help=help_)
            p.set_defaults(func=_broken(name, exc))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    words = [a for a in args_list if not a.startswith("-")]
    first = words[0] if words else None
    if words[:2] == ["convert", "inspect-quant"]:  # the command's old spelling
        print(
            "edgecloud: 'convert inspect-quant' is now 'edgecloud inspect-quant'", file=sys.stderr
        )
        return EXIT_USAGE
    parser = build_parser(first if first in COMMANDS else None)
    args = parser.parse_args(args_list)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(func(args))
    except MissingDependencyError as exc:
        print(f"edgecloud: {exc}", file=sys.stderr)
        return EXIT_MISSING_DEP
    except (ConfigError, InputError, DataError) as exc:
        print(f"edgecloud: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EdgeCloudError as exc:
        print(f"edgecloud: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
