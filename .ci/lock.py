"""The dependency lock: check it against pyproject.toml and against what is installed.

pyproject.toml keeps honest ranges for people who install the library; the repo's own commands
(dev.sh, CI) install `requirements-lock.txt`, one exact version per package, so a fresh machine
gets what main was tested with instead of whatever was released this morning.

    python .ci/lock.py check  [--extras dev,samples]   # every pyproject requirement is pinned in
                                                        # the lock at a version its range allows
    python .ci/lock.py freeze-diff                      # the running interpreter's environment is
                                                        # exactly the lock (prints the difference)
    python .ci/lock.py write  --extras dev,samples      # rewrite the lock from the running
                                                        # interpreter's environment (./dev.sh lock)

Run it with the project's venv interpreter: it needs `packaging`, which the lock installs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements-lock.txt"
DEFAULT_EXTRAS = "dev,samples"
HEADER = """\
# The locked environment that ./dev.sh and CI install (pip install -c requirements-lock.txt).
# Extras locked: {extras}. Python {python}.
# Refresh: ./dev.sh lock   (a fresh venv, the newest releases pyproject allows, then pip freeze).
# CI fails when a pyproject range excludes a pinned version or the installed set differs.
"""


def project_requirements(extras: list[str]) -> list[Requirement]:
    """Build requirements, base dependencies and the named extras (following `edgecloud[...]`)."""
    data = tomllib.loads(PYPROJECT.read_text())
    project = data["project"]
    name = canonicalize_name(project["name"])
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    # dev.sh builds the editable install without isolation, so the build backend is locked too.
    out = [Requirement(r) for r in data.get("build-system", {}).get("requires", [])]
    out += [Requirement(r) for r in project.get("dependencies", [])]
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"lock: pyproject.toml has no extra {extra!r}")
        seen.add(extra)
        for spec in optional[extra]:
            req = Requirement(spec)
            if canonicalize_name(req.name) == name:
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


def parse_pins(lines: list[str], where: str) -> dict[str, str]:
    """`name==version` lines (comments and blanks ignored) as canonical name -> version."""
    pins: dict[str, str] = {}
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "==" not in line:
            raise SystemExit(f"{where}:{n}: expected name==version, got {line!r}")
        name, version = line.split("==", 1)
        pins[canonicalize_name(name.split("[", 1)[0])] = version.strip()
    return pins


def read_lock() -> dict[str, str]:
    if not LOCK.exists():
        raise SystemExit(f"lock: {LOCK.name} is missing; run ./dev.sh lock")
    return parse_pins(LOCK.read_text().splitlines(), LOCK.name)


def installed() -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return parse_pins(out.splitlines(), "pip freeze")


def cmd_check(extras: list[str]) -> int:
    pins = read_lock()
    env = {"extra": ""}
    problems: list[str] = []
    for req in project_requirements(extras):
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req}: not pinned in {LOCK.name}")
        elif not req.specifier.contains(Version(pins[name]), prereleases=True):
            problems.append(f"{req}: {LOCK.name} pins {name}=={pins[name]}, outside the range")
    for line in problems:
        print(f"lock: {line}", file=sys.stderr)
    if problems:
        print("lock: pyproject.toml and the lock disagree; run ./dev.sh lock", file=sys.stderr)
        return 1
    print(f"lock: pyproject.toml [{','.join(extras)}] agrees with {LOCK.name} ({len(pins)} pins)")
    return 0


def cmd_freeze_diff() -> int:
    pins, have = read_lock(), installed()
    rows = []
    for name in sorted(set(pins) | set(have)):
        want, got = pins.get(name), have.get(name)
        if want != got:
            rows.append(f"  {name}: lock {want or '-'}, installed {got or '-'}")
    if rows:
        print(f"lock: the environment differs from {LOCK.name}:", file=sys.stderr)
        print("\n".join(rows), file=sys.stderr)
        return 1
    print(f"lock: pip freeze matches {LOCK.name} exactly ({len(pins)} packages)")
    return 0


def cmd_write(extras: list[str]) -> int:
    have = installed()
    py = ".".join(map(str, sys.version_info[:3]))
    body = "".join(f"{name}=={have[name]}\n" for name in sorted(have))
    LOCK.write_text(HEADER.format(extras=",".join(extras), python=py) + body)
    print(f"lock: wrote {len(have)} pins to {LOCK.name}")
    return cmd_check(extras)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["check", "freeze-diff", "write"])
    ap.add_argument("--extras", default=DEFAULT_EXTRAS)
    args = ap.parse_args()
    extras = [e for e in args.extras.split(",") if e]
    if args.command == "check":
        return cmd_check(extras)
    if args.command == "freeze-diff":
        return cmd_freeze_diff()
    return cmd_write(extras)


if __name__ == "__main__":
    sys.exit(main())
