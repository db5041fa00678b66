"""Scaling benchmark: every method on 1 and 2 workers of each backend, four models. Same as `paratime bench`.

    python benchmarks/scaling.py [--quick] [--out bench_out]
"""

import sys

from paratime.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
