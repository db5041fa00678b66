"""Sample with the torch.distributed backend, one process per GPU (or per CPU worker with gloo).

Single node:   torchrun --nproc_per_node=N launch/sample.py --model digits --steps 100 --json stats.json
Multi node:    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \\
                   --rdzv_endpoint=HOST:29500 launch/sample.py --model digits ...
Every option of `paratime sample` applies; rank 0 writes the PNG, the samples (--save) and the stats (--json), and
checks before sampling that it can. Without torchrun, `paratime sample --backend torch --workers N` starts the N
local ranks itself (N at most the usable CPU cores, or the GPUs on CUDA).
"""

import sys

from paratime.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", "--backend", "torch", *sys.argv[1:]]))
