"""Sample with the Ray backend: one actor (model replica) per GPU, or per CPU here.

Local:    python launch/ray_sample.py --workers 2 --model digits --steps 100
Cluster:  python launch/ray_sample.py --workers 8 --address auto ...   (after `ray start --head` / joining nodes)
Every option of `paratime sample` applies.
"""

import sys

from paratime.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", "--backend", "ray", *sys.argv[1:]]))
