"""Started by test_cluster.py the way srun starts a task (SLURM_* variables, no torchrun): joins
the process group through stcli.infra.distributed.setup, all-reduces rank + 1 and records it; then
rank 0 sleeps argv[2] seconds (a stand-in for drawing the sample grid while the others wait)
before a second all-reduce, which the others give up on once the process-group timeout passes."""

import json
import os
import sys
import time

import torch

from stcli.infra import distributed

if __name__ == "__main__":
    out, delay = sys.argv[1], float(sys.argv[2])
    ctx = distributed.setup("cpu")
    total = distributed.all_reduce_sum(torch.tensor([ctx.rank + 1.0])).item()
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    with open(f"{out}/rank-{ctx.rank}.json", "w") as f:
        json.dump({"rank": ctx.rank, "world": ctx.world_size, "total": total,
                   "env": {k: os.environ.get(k) for k in keys}}, f)
    if ctx.rank == 0:
        time.sleep(delay)
    distributed.all_reduce_sum(torch.zeros(1))
    with open(f"{out}/second-{ctx.rank}.json", "w") as f:
        json.dump({"rank": ctx.rank}, f)
    distributed.teardown()
