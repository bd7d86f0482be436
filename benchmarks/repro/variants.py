"""The experiments of docs/reproduction.md as recipe overrides: the paper's Table 4 losses
(and Table 7's P_k) on two small data sets, with one budget for every loss.

A job is (data set, loss variant, seed); its recipe is the base recipe with the data set's
shortening overrides, the variant's overrides and the seed — exactly what
`st train BASE KEY=VALUE ...` would run (see `Job.command`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EPS = 1.0e-5


def hard() -> str:
    return f"truncation={{name: hard, eps: {EPS}}}"


def power(k: float) -> str:
    return f"truncation={{name: power, k: {k}, eps: {EPS}}}"


LIKELIHOOD = ("loss.weighting=likelihood", "loss.time_sampling=importance")


@dataclass(frozen=True)
class Variant:
    key: str
    label: str  # the paper's notation
    overrides: tuple[str, ...]
    tables: str = "4"


TABLE4 = (
    Variant("g2", "L(θ; g², ε)", (hard(), *LIKELIHOOD), "4, 7 (P∞)"),
    Variant("var", "L(θ; σ², ε)", (hard(), "loss.weighting=variance", "loss.time_sampling=uniform")),
    Variant("g2P1", "L(θ; g²_P1, ε)", (hard(), "loss.weighting=g2_P", "loss.time_sampling=importance",
                                      f"loss.weighting_P={{name: power, k: 1.0, eps: {EPS}}}")),
    Variant("st_P1", "L_ST(θ; g², P1)", (power(1.0), *LIKELIHOOD), "4, 7"),
    Variant("st_P0.9", "L_ST(θ; g², P0.9)", (power(0.9), *LIKELIHOOD), "4, 7"),
)
STF = "loss.target={name: stf, reference_batch: 2048}"
STF_CHECK = (  # Stable Target Field on top of the likelihood-weighted losses (seed 002)
    Variant("g2", "L(θ; g², ε)", (hard(), *LIKELIHOOD), "STF"),
    Variant("g2_stf", "L(θ; g², ε) + STF", (hard(), *LIKELIHOOD, STF), "STF"),
    Variant("st_P1", "L_ST(θ; g², P1)", (power(1.0), *LIKELIHOOD), "STF"),
    Variant("st_P1_stf", "L_ST(θ; g², P1) + STF", (power(1.0), *LIKELIHOOD, STF), "STF"),
)
TABLE6 = tuple(  # the epsilon sweep, vanilla and ST P1; "g2" (eps = 1e-5) is the baseline
    v for eps in (1e-2, 1e-3, 1e-4, 1e-5) for v in (
        Variant("g2" if eps == EPS else f"g2_eps{eps:g}", f"L(θ; g², ε={eps:g})",
                (f"truncation={{name: hard, eps: {eps}}}", *LIKELIHOOD), "6"),
        Variant(f"st_P1_eps{eps:g}", f"L_ST(θ; g², P1), ε={eps:g}",
                (f"truncation={{name: power, k: 1.0, eps: {eps}}}", *LIKELIHOOD), "6")))
TABLE7 = (
    Variant("st_P0", "L_ST(θ; g², P0)", (power(0.0), *LIKELIHOOD), "7"),
    Variant("st_P2", "L_ST(θ; g², P2)", (power(2.0), *LIKELIHOOD), "7"),
)


@dataclass(frozen=True)
class Budget:
    """Training and evaluation sizes, the same for every variant of a data set."""

    steps: int
    ema: float  # short runs need a short EMA: ema^steps, the initial weights' share, ~0
    seeds: tuple[int, ...]
    nll_limit: int  # test items of the ODE likelihood and the NELBO
    nll_tol: float  # rtol = atol of the ODE solver
    nelbo_samples: int  # Monte Carlo draws of (t, z) per test item
    n_samples: int  # samples drawn for the sample-quality score
    sampler_steps: int  # Heun steps on the probability-flow ODE (2 NFE each)


@dataclass(frozen=True)
class DataSet:
    key: str
    recipe: str  # base recipe, relative to the repository root
    shorten: tuple[str, ...]  # overrides shared by every variant
    full: Budget
    quick: Budget
    variants: tuple[Variant, ...]
    divergence: str  # of the ODE likelihood: exact in 2-D, Hutchinson otherwise
    quality: str  # name of the sample-quality score


RUN = ("train.device=cpu", "train.sample_every=0", "train.log_every=100")
DIGITS = DataSet(
    "digits", "recipes/quickstart_digits.yaml", ("net.nf=16", "train.ckpt_every=100000", *RUN),
    full=Budget(500, 0.99, (0, 1, 2), 64, 1e-4, 64, 500, 20),
    quick=Budget(20, 0.9, (0, 1), 8, 1e-3, 2, 80, 4),
    variants=TABLE4, divergence="rademacher", quality="FID")
TOY2D = DataSet(
    "toy2d", "recipes/toy2d_gmm_mlp_vp_st.yaml", ("train.ckpt_every=100000", *RUN),
    full=Budget(1500, 0.99, (0, 1, 2), 500, 1e-4, 256, 4000, 50),
    quick=Budget(200, 0.98, (0, 1), 16, 1e-3, 2, 256, 4),
    variants=TABLE4 + TABLE7, divergence="exact", quality="MMD")
TOY2D_STF = DataSet(  # not in the default run: `run.py --data toy2d_stf` (docs/stf.md)
    "toy2d_stf", TOY2D.recipe, TOY2D.shorten, full=TOY2D.full, quick=TOY2D.quick,
    variants=STF_CHECK, divergence="exact", quality="MMD")
TOY2D_EPS = DataSet(  # not in the default run: `run.py --data toy2d_eps` (Table 6)
    "toy2d_eps", TOY2D.recipe, TOY2D.shorten, full=TOY2D.full, quick=TOY2D.quick,
    variants=TABLE6, divergence="exact", quality="MMD")
DATASETS = {d.key: d for d in (DIGITS, TOY2D, TOY2D_STF, TOY2D_EPS)}


@dataclass(frozen=True)
class Job:
    data: DataSet
    variant: Variant
    seed: int
    budget: Budget
    root: Path  # output root (runs/repro or runs/repro-quick)

    @property
    def out_dir(self) -> Path:
        return self.root / "jobs" / self.data.key / self.variant.key / f"seed{self.seed}"

    @property
    def overrides(self) -> list[str]:
        out = self.out_dir.relative_to(ROOT) if self.out_dir.is_relative_to(ROOT) else self.out_dir
        return [*self.data.shorten, f"train.steps={self.budget.steps}",
                f"train.ema={self.budget.ema}", "train.ema_warmup=false", *self.variant.overrides,
                f"seed={self.seed}", f"name={self.data.key}_{self.variant.key}_s{self.seed}",
                f"train.out_dir={out}"]

    def recipe(self):
        from stcli.recipe import load_recipe

        return load_recipe(ROOT / self.data.recipe, self.overrides)

    def command(self) -> str:
        """The equivalent `st train` command line."""
        quoted = [f"'{o}'" if " " in o or "{" in o else o for o in self.overrides]
        return " ".join(["st train", self.data.recipe, *quoted])


@dataclass(frozen=True)
class Plan:
    quick: bool
    root: Path
    datasets: tuple[str, ...] = ("digits", "toy2d")
    jobs: list[Job] = field(default_factory=list)

    def __post_init__(self):
        for key in self.datasets:
            data = DATASETS[key]
            budget = data.quick if self.quick else data.full
            self.jobs.extend(Job(data, v, s, budget, self.root)
                             for v in data.variants for s in budget.seeds)
