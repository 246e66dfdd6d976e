import sys

from edgecloud.cli.main import main

sys.exit(main())
