"""Run as the two ranks of one gloo group by test_ddp.py: trains a tiny recipe and records, per
rank, every tau drawn (through a truncation registered here, the public registry API), every STF
reference batch with the micro-batch it served, the rows of each sample grid it drew (and rank 0
the last grid again, alone), and the final parameters.  Extra arguments after the output folder
are recipe overrides."""

import json
import sys
from typing import Literal

import torch
from safetensors.torch import save_file

from stcli.components.stf import STF
from stcli.components.truncation import Power
from stcli.infra.distributed import Context
from stcli.infra.registry import TRUNCATIONS


@TRUNCATIONS.register
class RecordedPower(Power):
    name: Literal["recorded_power"] = "recorded_power"

    def sample(self, generator=None) -> float:
        tau = super().sample(generator)
        DRAWN.append(tau)
        return tau


def recorded_noise_target(self, x_t, x0, z, mean, std, reference=None):
    REFERENCES.append((reference.images.clone(), x0.clone()))
    return STF_NOISE_TARGET(self, x_t, x0, z, mean, std, reference)


STF_NOISE_TARGET, STF.noise_target = STF.noise_target, recorded_noise_target


DRAWN: list[float] = []
REFERENCES: list[tuple[torch.Tensor, torch.Tensor]] = []

if __name__ == "__main__":
    from stcli.components.recipe import load_recipe
    from stcli.jobs import train as train_mod

    recipe_path, out = sys.argv[1], sys.argv[2]
    recipe = load_recipe(recipe_path, ["truncation.name=recorded_power", *sys.argv[3:]])
    trainer_box = {}
    real_init = train_mod.Trainer.__init__

    def keep(self, *a, **k):
        real_init(self, *a, **k)
        trainer_box["t"] = self

    train_mod.Trainer.__init__ = keep
    grid_rows, real_share = [], train_mod.grid_share

    def share(n, ctx):
        rows = real_share(n, ctx)
        grid_rows.append(list(rows))
        return rows

    train_mod.grid_share = share
    train_mod.train(recipe)
    t = trainer_box["t"]
    rank = t.ctx.rank
    save_file({k: v.contiguous() for k, v in t.model.state_dict().items()},
              f"{out}/params-{rank}.safetensors")
    save_file({f"{kind}.{i}": t.contiguous() for i, pair in enumerate(REFERENCES)
               for kind, t in zip(("reference", "x0"), pair)}, f"{out}/references-{rank}.safetensors")
    with open(f"{out}/tau-{rank}.json", "w") as f:
        json.dump({"tau": DRAWN, "world": t.ctx.world_size, "grid_rows": grid_rows}, f)
    if recipe.train.sample_every and rank == 0:  # the last grid again, from the same EMA, alone
        t.ctx = Context(0, 1, t.device)
        t.sample_grid(f"{out}/single-process-grid.png")
