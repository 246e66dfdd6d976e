"""The shipped secure broker setup: Mosquitto's dynamic-security plugin with explicit roles.

Mosquitto's ``acl_file`` grants every SUBSCRIBE and only withholds, at delivery, the messages a
client may not read. With shared subscriptions that is not enough: a device that subscribes to
``$share/<the workers' group>/.../request`` joins the workers' group, is handed its share of every
device's requests, and Mosquitto then withholds them from it, so those requests are never
answered. A secret group name is no defence. The dynamic-security plugin checks the SUBSCRIBE
itself, against the *full* filter (``$share/<group>/...`` included), and refuses what no role
grants with SUBACK 0x87. So the roles here grant:

- ``edgecloud-device-<id>``, one per device (Mosquitto 2.0's plugin has no ``%u`` substitution):
  publish its own requests, reported state, job updates, telemetry and status, and subscribe
  (literal filters) to its own reply topic, desired and reported state and job notifications.
  Nothing under another device, nothing with ``$share``.
- ``edgecloud-worker-<region>``: exactly one subscription, the literal
  ``$share/<group>/<prefix>/devices/+/infer/<region>/request``, and publishing replies.
- ``edgecloud-controller``: the four fleet filters (literal) and publishing desired state and
  jobs under ``<prefix>/devices/``.

Every other access is denied by default (``defaultACLAccess`` all false but unsubscribe).

``python -m edgecloud.broker_security --users users.txt --region eu [--group G] > dynsec.json``
writes the plugin's configuration file (samples/mosquitto/dynsec.conf loads it); ``users.txt``
has one ``username password role`` line per client, role ``device``, ``worker`` or
``controller``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from edgecloud.errors import ConfigError
from edgecloud.topics import Topics, check_segment

__all__ = ["device_role", "dynsec_config", "hash_password", "main", "roles"]

_ITERATIONS = 101  # the plugin's own default


def hash_password(password: str, *, salt: bytes | None = None) -> dict[str, Any]:
    """The plugin's password fields: base64 PBKDF2-HMAC-SHA512 over a 12-byte salt."""
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": _ITERATIONS,
    }


def _acl(kind: str, topic: str) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "priority": 0, "allow": True}


def device_role(topics: Topics, device_id: str) -> list[dict[str, Any]]:
    """The ACL entries of one device: its own topics, literal subscriptions only."""
    dev = topics.device(device_id)
    return [
        _acl("publishClientSend", f"{dev}/infer/+/request"),
        _acl("publishClientSend", topics.shadow_reported(device_id)),
        _acl("publishClientSend", f"{dev}/jobs/+/update"),
        _acl("publishClientSend", topics.telemetry(device_id)),
        _acl("publishClientSend", topics.status(device_id)),
        _acl("publishClientReceive", f"{dev}/#"),
        _acl("subscribeLiteral", topics.infer_reply(device_id)),
        _acl("subscribeLiteral", topics.shadow_desired(device_id)),
        _acl("subscribeLiteral", topics.shadow_reported(device_id)),
        _acl("subscribeLiteral", topics.jobs_notify(device_id)),
    ]


def roles(
    topics: Topics, regions: Iterable[tuple[str, str | None]]
) -> dict[str, list[dict[str, Any]]]:
    """Role name -> ACL entries for the controller and each ``(region, group)``'s workers."""
    p = topics.prefix
    out: dict[str, list[dict[str, Any]]] = {
        "edgecloud-controller": [
            _acl("publishClientSend", f"{p}/devices/+/shadow/desired"),
            _acl("publishClientSend", f"{p}/devices/+/jobs/notify"),
            _acl("publishClientReceive", f"{p}/devices/#"),
            *(
                _acl("subscribeLiteral", f)
                for f in (
                    topics.all_status(),
                    topics.all_reported(),
                    topics.all_job_updates(),
                    topics.all_telemetry(),
                )
            ),
        ],
    }
    for region, group in regions:
        check_segment(region, "region")
        out[f"edgecloud-worker-{region}"] = [
            _acl("subscribeLiteral", topics.infer_worker_filter(region, group)),
            _acl("publishClientReceive", f"{p}/devices/+/infer/{region}/request"),
            _acl("publishClientSend", f"{p}/devices/+/infer/reply"),
        ]
    return out


def dynsec_config(
    users: Iterable[tuple[str, str, str]],
    *,
    regions: Sequence[tuple[str, str | None]],
    prefix: str = "edgecloud",
) -> dict[str, Any]:
    """The plugin's JSON configuration for ``users`` (username, password, role).

    ``role`` is ``device`` (username must be the device id), ``worker`` (may serve every region
    in ``regions``) or ``controller``.
    """
    topics = Topics(prefix)
    all_roles = roles(topics, regions)
    clients = []
    for username, password, role in users:
        if role == "device":
            check_segment(username, "device id")
            names = [f"edgecloud-device-{username}"]
            all_roles[names[0]] = device_role(topics, username)
        elif role == "worker":
            names = [f"edgecloud-worker-{r}" for r, _ in regions]
            if not names:
                raise ConfigError("a worker needs at least one --region")
        elif role == "controller":
            names = ["edgecloud-controller"]
        else:
            raise ConfigError(
                f"user {username!r}: role {role!r} is not device, worker or controller"
            )
        if not password:
            raise ConfigError(f"user {username!r} has an empty password")
        clients.append(
            {
                "username": username,
                **hash_password(password),
                "roles": [{"rolename": n} for n in names],
            }
        )
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": clients,
        "groups": [],
        "roles": [{"rolename": name, "acls": acls} for name, acls in all_roles.items()],
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgecloud.broker_security")
    ap.add_argument("--users", required=True, help="file of 'username password role' lines")
    ap.add_argument("--region", action="append", default=[], help="a region (repeatable)")
    ap.add_argument(
        "--group", action="append", default=[], help="share group per --region, in order"
    )
    ap.add_argument("--prefix", default="edgecloud")
    args = ap.parse_args(argv)
    groups: list[str | None] = list(args.group) + [None] * len(args.region)
    users = []
    try:
        with open(args.users, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if not parts or parts[0].startswith("#"):
                    continue
                if len(parts) != 3:
                    raise ConfigError(f"{args.users}:{n}: expected 'username password role'")
                users.append((parts[0], parts[1], parts[2]))
        cfg = dynsec_config(
            users, regions=list(zip(args.region, groups, strict=False)), prefix=args.prefix
        )
    except (OSError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json.dump(cfg, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
