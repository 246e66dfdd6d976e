"""``edgecloud keys generate``: the Ed25519 key pair that signs model packages."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgecloud.package import generate_keypair, key_id, load_public_key


def register(sub: Any) -> None:
    p = sub.add_parser("keys", help="generate Ed25519 signing keys")
    ksub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    g = ksub.add_parser("generate", help="write NAME (private, mode 0600) and NAME.pub")
    g.add_argument("--out", required=True, type=Path, help="path of the private key")
    g.add_argument("--force", action="store_true", help="overwrite existing key files")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    priv, pub = generate_keypair(args.out, force=args.force)
    kid = key_id(load_public_key(pub))
    if args.json:
        print(json.dumps({"private_key": str(priv), "public_key": str(pub), "key_id": kid}))
    else:
        print(f"private key: {priv} (keep it secret; mode 0600)")
        print(f"public key:  {pub} (give it to devices)")
        print(f"key id:      {kid}")
    return 0
