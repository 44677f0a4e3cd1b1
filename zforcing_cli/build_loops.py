"""`python -m zforcing_cli.build_loops [--rebuild]`: build the compiled CPU loops of
fused_cpu.py now, and say where they are or why they cannot be (--rebuild: forget a failed
build and try again). (Its own module because the package imports
fused_cpu: run as `-m`, fused_cpu would be loaded a second time.)"""

import sys

from .fused_cpu import main

if __name__ == "__main__":
    sys.exit(main())
