import sys

from expertmesh.gateway.cli import main

sys.exit(main())
