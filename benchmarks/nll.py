"""NLL wall time and NFE per batch: st's batched torch Dormand–Prince against the usual
approach, scipy.integrate.solve_ivp(method="RK45") on the flattened batch with a device -> numpy
round trip per function evaluation, at the same rtol/atol, data and Hutchinson probes.

    python benchmarks/nll.py [--ckpt runs/quickstart_digits/ckpt.safetensors] [--batch 64]

Without --ckpt a fresh small U-Net (quickstart configuration, random weights) is used.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from scipy.integrate import solve_ivp

from stcli.likelihood import bits_per_dim, draw_probes, flow_drift, nll, value_and_divergence
from stcli.loading import load_model
from stcli.nets import build_score_model
from stcli.recipe import load_recipe


def scipy_nll(score_fn, sde, x, vs, eps, rtol, atol):
    """The score_sde-style solve: one RK45 solve of the flattened (x, delta) state."""
    shape, n, device = x.shape, x.shape[0], x.device
    nfe = 0

    def rhs(t, y):
        nonlocal nfe
        nfe += 1
        xt = torch.from_numpy(y[: -n]).reshape(shape).to(device, x.dtype)
        tt = torch.full((n,), t, device=device, dtype=x.dtype)
        drift, div = value_and_divergence(lambda z: flow_drift(score_fn, sde, z, tt), xt,
                                          "rademacher", vs)
        return np.concatenate([drift.flatten().cpu().double().numpy(), div.cpu().double().numpy()])

    y0 = np.concatenate([x.flatten().cpu().double().numpy(), np.zeros(n)])
    sol = solve_ivp(rhs, (eps, sde.T), y0, rtol=rtol, atol=atol, method="RK45")
    x_T = torch.from_numpy(sol.y[: -n, -1]).reshape(shape).to(x.dtype)
    delta = torch.from_numpy(sol.y[-n:, -1]).to(x.dtype)
    return -(sde.prior_logp(x_T) + delta), nfe


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.ckpt:
        loaded = load_model(args.ckpt, device=args.device)
        recipe, model = loaded.recipe, loaded.model
    else:
        recipe = load_recipe("recipes/quickstart_digits.yaml")
        model = build_score_model(recipe.net, recipe.sde, recipe.data.shape,
                                  getattr(recipe.data, "centered", True)).to(args.device).eval()
    data = recipe.data.for_evaluation()
    raw = torch.stack([data.create("test")[i] for i in range(args.batch)]).to(args.device)
    g = torch.Generator(args.device).manual_seed(0)
    x = data.transform(raw, g)
    sde, eps, dim = recipe.sde, recipe.truncation.eps, data.dim
    vs = draw_probes(x.shape, "rademacher", 1, torch.Generator(args.device).manual_seed(1),
                     x.device, x.dtype)

    def ours():
        return nll(model.score, sde, x, eps=eps, correction="before", rtol=args.rtol,
                   atol=args.atol, generator=torch.Generator(args.device).manual_seed(1))

    rows = []
    for name, fn in (("scipy RK45 (baseline)", lambda: scipy_nll(model.score, sde, x, vs, eps,
                                                                 args.rtol, args.atol)),
                     ("st dopri5 (torch)", ours)):
        t0 = time.perf_counter()
        val, nfe = fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        rows.append((name, time.perf_counter() - t0, nfe, bits_per_dim(val, dim, 7).mean().item()))
    base = rows[0]
    print(f"device {args.device}, batch {args.batch}, rtol {args.rtol}, atol {args.atol}, "
          f"threads {torch.get_num_threads()}")
    print("| solver | wall s | NFE | NLL bits/dim | speed-up | dNLL bits/dim |")
    print("|---|---|---|---|---|---|")
    for name, sec, nfe, bpd in rows:
        print(f"| {name} | {sec:.2f} | {nfe} | {bpd:.4f} | {base[1] / sec:.2f}x | "
              f"{abs(bpd - base[3]):.4f} |")
    assert math.isfinite(rows[1][3])


if __name__ == "__main__":
    main()
