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
DIGITS_STEPS, DIGITS_CURVE = 3000, (1000, 2000)  # the 3-hour budget of the first tables
DIGITS_MAX = 30000  # --converge: the cap of a loss that does not converge
TOY2D_STEPS, TOY2D_CURVE = 6000, (1000, 2000, 4000)  # the convergence criterion


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
TABLE5 = (  # the variance-weighted pair; "var" (σ² without ST) is Table 4's
    Variant("var_st_P1", "L_ST(θ; σ², P1)", (power(1.0), "loss.weighting=variance",
                                           "loss.time_sampling=uniform"), "5"),
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


# 2 x 17 + the final Tweedie step = 35 NFE, as EDM counts, on the grid uniform in t that every
# table of docs/reproduction.md was measured with (the recipes' Euler-Maruyama grid, which a
# switched sampler inherited until samplers kept their own defaults)
HEUN35 = {"name": "heun", "steps": 17, "schedule": "uniform"}


@dataclass(frozen=True)
class Budget:
    """Training and evaluation sizes, the same for every variant of a data set."""

    steps: int
    seeds: tuple[int, ...]
    nll_limit: int  # test items of the ODE likelihood and the NELBO
    nll_tol: float  # rtol = atol of the ODE solver
    nelbo_samples: int  # Monte Carlo draws of (t, z) per test item
    n_samples: int  # samples drawn for the sample-quality score, per sampler
    # name -> `st sample` sampler overrides ({} = the recipe's own); the first also scores the curve
    samplers: dict = field(default_factory=lambda: {"heun35": HEUN35, "em": {}})
    ema: float | None = None  # None: the recipe's EMA with warm-up; else this rate, no warm-up
    snapshot_every: int = 0  # EMA snapshots ckpt-<step>.safetensors (0: none)
    curve: tuple[int, ...] = ()  # snapshot steps measured for the learning curve (seed 0)
    shorten: tuple[str, ...] = ()  # overrides of this budget only
    chunk: int = 0  # --converge: steps trained between the pilot's measurements (steps: the cap)


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
    extras: tuple[Variant, ...] = ()  # run only with --extras, after every data set's main variants
    converge: Budget | None = None  # --converge: each loss trained until its seed 0 converges
    converge_quick: Budget | None = None

    def recipe_obj(self):
        """The base recipe with the shared overrides (data, SDE: what the evaluation needs)."""
        from stcli.components.recipe import load_recipe

        return load_recipe(ROOT / self.recipe, list(self.shorten))


RUN = ("train.device=cpu", "train.sample_every=0", "train.log_every=100")
# The paper's settings (docs/fidelity.md): VP losses reduced by the mean, training data not
# dequantised (the evaluation dequantises), eps = 1e-5 (the variants), the recipes' EMA with
# warm-up. Budgets from the convergence study of L(θ; g², ε) in docs/reproduction.md.
PAPER = ("loss.reduce=mean",)
DIGITS = DataSet(
    "digits", "recipes/quickstart_digits.yaml",
    ("net.nf=16", "data.dequantization=none", *PAPER, "train.ckpt_every=500", *RUN),
    full=Budget(DIGITS_STEPS, (0, 1, 2), 64, 1e-4, 64, 500, snapshot_every=500, curve=DIGITS_CURVE),
    quick=Budget(20, (0, 1), 8, 1e-3, 2, 80, {"heun35": {**HEUN35, "steps": 4},
                                             "em": {"steps": 8}}, snapshot_every=10, curve=(10,)),
    variants=TABLE4 + TABLE5, divergence="rademacher", quality="FID", extras=TABLE7[1:],
    converge=Budget(DIGITS_MAX, (0, 1, 2), 64, 1e-4, 64, 500, snapshot_every=1000, chunk=1000),
    converge_quick=Budget(40, (0, 1), 8, 1e-3, 2, 80, {"heun35": {**HEUN35, "steps": 4},
                                                      "em": {"steps": 8}}, snapshot_every=10, chunk=10))
TOY2D = DataSet(
    "toy2d", "recipes/toy2d_gmm_mlp_vp_st.yaml", (*PAPER, "train.ckpt_every=1000", *RUN),
    full=Budget(TOY2D_STEPS, (0, 1, 2), 500, 1e-4, 256, 4000, snapshot_every=1000, curve=TOY2D_CURVE),
    quick=Budget(200, (0, 1), 16, 1e-3, 2, 256, {"heun35": {**HEUN35, "steps": 4},
                                                "em": {"steps": 8}}, snapshot_every=100, curve=(100,)),
    variants=TABLE4 + TABLE5, divergence="exact", quality="MMD", extras=TABLE7)
# The short runs of the first reproduction (500/1500 steps, EMA 0.99 without warm-up, loss
# summed, Heun 50 steps), kept for docs/stf.md and Table 6, which were measured with them.
SHORT = ("loss.reduce=sum", "train.ckpt_every=100000", *RUN)
SHORT_FULL = Budget(1500, (0, 1, 2), 500, 1e-4, 256, 4000, {"heun": {**HEUN35, "steps": 50}},
                    ema=0.99)
SHORT_QUICK = Budget(200, (0, 1), 16, 1e-3, 2, 256, {"heun": {**HEUN35, "steps": 4}}, ema=0.98)
TOY2D_STF = DataSet(  # not in the default run: `run.py --data toy2d_stf` (docs/stf.md)
    "toy2d_stf", TOY2D.recipe, SHORT, full=SHORT_FULL, quick=SHORT_QUICK,
    variants=STF_CHECK, divergence="exact", quality="MMD")
TOY2D_EPS = DataSet(  # not in the default run: `run.py --data toy2d_eps` (Table 6)
    "toy2d_eps", TOY2D.recipe, SHORT, full=SHORT_FULL, quick=SHORT_QUICK,
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
        b = self.budget
        ema = (f"train.ema={b.ema}", "train.ema_warmup=false") if b.ema is not None else ()
        snap = (f"train.snapshot_every={b.snapshot_every}", "train.snapshot_weights=ema") \
            if b.snapshot_every else ()
        return [*self.data.shorten, *b.shorten, f"train.steps={b.steps}", *ema, *snap,
                *self.variant.overrides, f"seed={self.seed}",
                f"name={self.data.key}_{self.variant.key}_s{self.seed}", f"train.out_dir={out}"]

    @property
    def curve_steps(self) -> tuple[int, ...]:
        """Snapshots measured for the learning curve: seed 0 only (the final step is the job's
        own measurement)."""
        return tuple(s for s in self.budget.curve if s < self.budget.steps) if self.seed == 0 else ()

    def recipe(self):
        from stcli.components.recipe import load_recipe

        return load_recipe(ROOT / self.data.recipe, self.overrides)

    def command(self) -> str:
        """The equivalent `st train` command line."""
        quoted = [f"'{o}'" if " " in o or "{" in o else o for o in self.overrides]
        return " ".join(["st train", self.data.recipe, *quoted])


@dataclass(frozen=True)
class Plan:
    quick: bool
    root: Path
    datasets: tuple[str, ...] = ("toy2d", "digits")
    extras: bool = False  # also the data sets' extra variants (Table 7's P0/P2), after the rest
    losses: tuple[str, ...] | None = None  # only these variant keys (None: all)
    converge: bool = False  # the data sets' converge budgets (until_converged.py)
    jobs: list[Job] = field(default_factory=list)

    def __post_init__(self):
        """Data set by data set (the cheap toy2d first), then (with `extras`) every data set's
        extras; within each, seed-major: the first seed of every loss before the second, so
        that a run cut short still gives complete (paired) tables over the seeds it finished."""
        for part in ("variants", "extras") if self.extras else ("variants",):
            for key in self.datasets:
                data = DATASETS[key]
                budget = data.quick if self.quick else data.full
                if self.converge:
                    budget = data.converge_quick if self.quick else data.converge
                self.jobs.extend(Job(data, v, s, budget, self.root)
                                 for s in budget.seeds for v in getattr(data, part)
                                 if self.losses is None or v.key in self.losses)
