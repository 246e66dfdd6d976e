"""``python -m device_agent --config agent.toml`` (same as ``edgecloud agent run``)."""

from __future__ import annotations

import sys

from edgecloud.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["agent", "run", *sys.argv[1:]]))
