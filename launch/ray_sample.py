"""Sample with the Ray backend: one actor (model replica) per GPU, or per CPU here.

Local:    python launch/ray_sample.py --workers 2 --model digits --steps 100
Cluster:  python launch/ray_sample.py --workers 8 --address auto ...   (after `ray start --head` / joining nodes)
Every option of `paratime sample` applies. Locally --workers is at most the usable CPU cores (default min(2, cores));
an --address where nothing answers is refused at once instead of Ray waiting for minutes.
"""

import sys

from paratime.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", "--backend", "ray", *sys.argv[1:]]))
