"""Why adaptive tolerances do not control the likelihood's error on trained nets: the true
local error of each dopri5 step against its embedded estimate, and the spectrum of the
network's output along t.

    python benchmarks/nll_local_error.py --ckpt runs/toy/ckpt.safetensors [--tol 1e-3] [--batch 4]

1. The likelihood ODE in t (`correction before`, one Rademacher probe, float64) is solved by
   st's dopri5 at rtol = atol = --tol; every attempted step is then redone from the same state
   by dopri5 at 1e-9 (the true step), and the log-density's true local error is printed beside
   the embedded 4th-order estimate, in bits/dim (largest over the batch).
2. eps_hat(x, t) = -sigma s(x, t) for one test item on 1,024 points of t in [0.1, 0.2]; a cubic
   in t is removed and the share of the remaining energy above a few angular frequencies (rad
   per unit of t) printed: structure at frequencies w needs steps shorter than ~pi/w to be
   integrated, whatever the error estimate says.
"""

from __future__ import annotations

import argparse
import math

import torch

import stcli.infra.solvers as solvers
from stcli.components.likelihood import Flow, draw_probes, value_and_divergence
from stcli.components.loading import load_model


def local_errors(model, recipe, x, tol):
    sde, eps, dim = recipe.sde, recipe.truncation.eps, x[0].numel()
    vs = draw_probes(x.shape, "rademacher", 1, torch.Generator().manual_seed(1), x.device, x.dtype)
    flow = Flow(model.score, sde, eps, "t")

    def rhs(u, state):
        tt = torch.full((len(x),), float(u), dtype=x.dtype)
        return value_and_divergence(flow.field(float(u), tt), state[0], "rademacher", vs)

    steps, plain = [], solvers.dopri5_step

    def recorded(f, t, y, h, k1):
        out = plain(f, t, y, h, k1)
        steps.append((float(t), float(h), y, out[0], out[2]))
        return out

    solvers.dopri5_step = recorded
    try:
        _, nfe = solvers.dopri5(rhs, (x, torch.zeros(len(x), dtype=x.dtype)), flow.u0, flow.u1,
                                rtol=tol, atol=tol)
    finally:
        solvers.dopri5_step = plain
    bits = 1 / (dim * math.log(2))
    print(f"dopri5 in t at {tol:g}: {nfe} NFE, {len(steps)} step attempts")
    print("| t | h | true local error of log p, bits/dim | embedded estimate | true / estimate |")
    print("|---|---|---|---|---|")
    for t, h, y, y_new, err in steps:
        (_, fine), _ = solvers.dopri5(rhs, y, t, t + h, rtol=1e-9, atol=1e-9)
        true = float((y_new[1] - fine).abs().max()) * bits
        est = float(err[1].abs().max()) * bits
        print(f"| {t:.3g} | {h:.3g} | {true:.2e} | {est:.2e} | {true / max(est, 1e-300):.0f} |")


def spectrum(model, recipe, x, n=1024, t0=0.1, span=0.1):
    ts = t0 + span * torch.arange(n, dtype=torch.float64) / n
    with torch.no_grad():
        out = torch.cat([model.score(x[:1].expand(len(c), *x.shape[1:]), c) for c in ts.split(64)])
    out = out.flatten(1) * recipe.sde.std(ts)[:, None]
    basis = torch.stack([(ts - t0) ** k for k in range(4)], 1)
    res = out - basis @ torch.linalg.lstsq(basis, out).solution
    power = torch.fft.rfft(res * torch.hann_window(n, dtype=torch.float64)[:, None], dim=0)
    power = power.abs().pow(2).sum(1)[1:]
    w = 2 * math.pi * torch.arange(1, len(power) + 1) / span
    shares = ", ".join(f"> {lo}: {float(power[w > lo].sum() / power.sum()):.2f}"
                       for lo in (200, 500, 1000, 1500))
    print(f"eps_hat(t) on [{t0}, {t0 + span}] less a cubic: rms {float(res.pow(2).mean().sqrt()):.3g} "
          f"(eps_hat rms {float(out.pow(2).mean().sqrt()):.3g}); energy share above w rad/unit t: "
          f"{shares}; peak at w = {float(w[power.argmax()]):.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    loaded = load_model(args.ckpt, device="cpu")
    recipe, model = loaded.recipe, loaded.model.double()
    data = recipe.data.for_evaluation()
    dataset = data.create("test")
    raw = torch.stack([dataset[i] for i in range(args.batch)])
    x = data.transform(raw, torch.Generator().manual_seed(0)).double()
    print(f"{args.ckpt}: {recipe.name}, d = {x[0].numel()}, net {recipe.net.name}, "
          f"time input {recipe.net.time_input}")
    spectrum(model, recipe, x)
    local_errors(model, recipe, x, args.tol)


if __name__ == "__main__":
    main()
