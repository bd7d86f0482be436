"""The recipe: a YAML file validated by pydantic (extra="forbid" at every level).

Sections: data, sde, net, truncation, loss, optim, train, sample, eval.  Components are
chosen by `name:`, which equals their registry name; dotted `key=value` overrides (values
parsed as YAML) are applied before validation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from stcli.components.losses import ScoreMatchingLoss
from stcli.components.sdes import LinearSDE
from stcli.components.truncation import Hard
from stcli.infra.errors import UserError
from stcli.infra.registry import (
    DATASETS,
    LOGGERS,
    NETS,
    SAMPLERS,
    SDES,
    TRUNCATIONS,
    Strict,
    format_validation_error,
    live_unions,
)


class Section(Strict):
    pass


class Optim(Section):
    """Adam with linear warm-up and gradient-norm clipping (App. D: lr 2e-4, warm-up 5000, clip 1)."""

    lr: PositiveFloat = 2e-4
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 0.0
    warmup: NonNegativeInt = 5000
    grad_clip: NonNegativeFloat = 1.0  # 0 disables clipping


class Train(Section):
    steps: PositiveInt = 1300000
    batch_size: PositiveInt = 128  # global: split over ranks, then micro-batches
    micro_batches: PositiveInt = 1
    batch_per_device: PositiveInt | None = None  # EDM's --batch-gpu: sets micro_batches per device
    ema: float = Field(0.999, ge=0, lt=1)
    ema_warmup: bool = True  # rate min(ema, (1+n)/(10+n)) at update n, as score_sde's EMA
    log_every: PositiveInt = 50
    ckpt_every: PositiveInt = 10000
    snapshot_every: NonNegativeInt = 0  # keep ckpt-<step>.safetensors every this many steps
    keep_last: NonNegativeInt = 0  # keep only the newest this many snapshots (0: all)
    snapshot_weights: Literal["full", "ema"] = "full"  # ema: snapshots hold the EMA weights only
    sample_every: NonNegativeInt = 50000  # 0: no sample grids during training
    grid_size: PositiveInt = 64
    out_dir: str | None = Field(None, min_length=1, pattern=r"\S")  # default (None) runs/<name>
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16: autocast with a loss scaler
    compile: bool = False
    channels_last: bool | None = None  # model and batches in channels_last format; None: on CUDA
    tf32: bool = True  # CUDA: TF32 matmuls and convolutions (fp32 storage, 10-bit mantissa products)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # auto | cpu | cuda | cuda:N
    workers: NonNegativeInt | None = None  # loaders for file-backed data; None: 0 on CPU, up to 8 on CUDA
    log: list[str] = ["jsonl"]  # loggers (components/tracking.py): jsonl (always on), csv, tensorboard, wandb
    heldout_every: NonNegativeInt = 0  # loss on a fixed batch of the test split every this many steps
    eval_every: NonNegativeInt = 0  # FID (and KID) of the EMA weights every this many steps (eval.fid)
    heldout_size: PositiveInt = 256  # test items in that batch

    @field_validator("log")
    @classmethod
    def _known_loggers(cls, names: list[str]) -> list[str]:
        """Registered logger names, each once; jsonl is always on."""
        unknown = [n for n in names if n not in LOGGERS]
        if unknown:
            raise ValueError(f"unknown logger {unknown[0]!r}; available: {', '.join(LOGGERS.names())}")
        return list(dict.fromkeys(["jsonl", *names]))

    @model_validator(mode="after")
    def _micro(self):
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by micro_batches "
                             f"{self.micro_batches}")
        return self


class NllEval(Section):
    """The defaults `st nll` uses for a checkpoint of this recipe (its options override them).

    App. D integrates the probability-flow ODE on [eps = 1e-5, T] "as default, even for
    ImageNet32", whose vanilla runs train with eps = 5e-5: the evaluation eps is its own
    setting; None means the training eps (truncation.eps)."""

    eps: PositiveFloat | None = None
    correction: Literal["before", "after"] = "after"
    hutchinson: Literal["rademacher", "gaussian"] = "rademacher"
    probes: PositiveInt = 1  # Hutchinson probes averaged per datum
    repeats: PositiveInt = 1  # passes over the split with fresh dequantisation noise
    rtol: PositiveFloat = 1e-5  # the paper's protocol (scipy RK45 conventions in t)
    atol: PositiveFloat = 1e-5
    time_variable: Literal["t", "lambda", "lambda_scaled"] = "t"  # the ODE's integration variable
    error_norm: Literal["rms", "rms_per_part"] = "rms"

    @field_validator("eps")
    @classmethod
    def _below_T(cls, eps: float | None) -> float | None:
        """The integration interval [eps, T] needs eps in (0, T) (T = 1 for every SDE)."""
        if eps is not None and not eps < LinearSDE.T:
            raise ValueError(f"must lie in (0, T = {LinearSDE.T}), got {eps}")
        return eps


class FidEval(Section):
    """FID protocol.  resize: how images reach the Inception network's 299x299 input; "tf"
    is torch-fidelity's TF-compatible bilinear resize inside the network (the TF-Inception
    protocol of the paper's CIFAR-10 FIDs), "clean" is clean-fid's PIL bicubic resize with
    antialiasing (Parmar et al. 2022; the paper's other data sets, App. D)."""

    ref: str | None = None
    n: PositiveInt = 50000
    resize: Literal["tf", "clean"] = "tf"
    # during training (train.eval_every): samples per evaluation, the sampler (the recipe's
    # sampler with these settings; another name starts from that sampler's defaults), the
    # feature extractor (st-random-64: a tiny random network for tests), KID beside FID
    train_n: PositiveInt = 2000
    train_sampler: dict[str, Any] = {}
    extractor: str = "inception-v3-compat"
    kid: bool = True
    batch_size: PositiveInt = 64


class Eval(Section):
    nll: NllEval = NllEval()
    fid: FidEval = FidEval()


@live_unions(data=DATASETS, sde=SDES, net=NETS, truncation=TRUNCATIONS, sample=SAMPLERS)
class Recipe(Section):
    name: str
    seed: int = 0
    data: DATASETS.union()
    sde: SDES.union()
    net: NETS.union()
    truncation: TRUNCATIONS.union() = Hard()
    loss: ScoreMatchingLoss = ScoreMatchingLoss()
    optim: Optim = Optim()
    train: Train = Train()
    sample: SAMPLERS.union() = Field(default_factory=lambda: SAMPLERS.validate("euler_maruyama"))
    eval: Eval = Eval()

    @model_validator(mode="before")
    @classmethod
    def _sampler_alias(cls, data: Any) -> Any:
        """`sample: {sampler: pc, ...}` (the documented short form) is accepted for
        `sample: {name: pc, ...}`."""
        if isinstance(data, dict) and isinstance(data.get("sample"), dict):
            data = {**data, "sample": named_sampler(data["sample"])}
        return data

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        """The name is the run folder runs/<name>: one path component, not . or .."""
        if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0") \
                or not name.isprintable() or name != name.strip():
            raise ValueError(f"{name!r} must be a non-empty name of printable characters without "
                             "path separators or surrounding spaces (it names the run folder "
                             "runs/<name>), not '.' or '..'")
        return name

    @model_validator(mode="after")
    def _share_eps(self):
        """The SDE's eps (RVE, int_g2_sigma2) is the truncation's eps."""
        eps = self.truncation.eps
        if "eps" in self.sde.model_fields_set and self.sde.eps != eps:
            raise ValueError(f"sde.eps ({self.sde.eps}) differs from truncation.eps ({eps}); "
                             "set only truncation.eps")
        object.__setattr__(self, "sde", self.sde.model_copy(update={"eps": eps}))
        try:
            self.sample.check_stored(self.sde)
        except UserError as err:
            raise ValueError(f"sample: {err}") from None
        return self

    @property
    def nll_eps(self) -> float:
        """The eps `st nll` integrates from by default: eval.nll.eps, else truncation.eps."""
        eps = self.eval.nll.eps
        return self.truncation.eps if eps is None else eps

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out_dir or f"runs/{self.name}").expanduser()  # `~`: the home folder

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (every default filled in)."""
        return self.model_dump(mode="json", exclude={"sde": {"eps"}})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to nested dicts.

    A mapping value merges into the section it names (`train={steps: 3}` changes train.steps
    only), unless it names another component (`truncation={name: hard}` replaces the section);
    so does a dotted name (`sample.name=heun`, or `sample.sampler=heun`), applied before the
    other overrides so that `sample.steps=3` given with it is kept.  A key set twice, by any
    two overrides, is an error."""
    seen: dict[tuple[str, ...], str] = {}
    if isinstance(data.get("sample"), dict):  # the file's alias, before any override
        data["sample"] = named_sampler(data["sample"])
    overrides = [f"sample.name={o[len('sample.sampler='):]}" if o.startswith("sample.sampler=")
                 else o for o in overrides]
    given = {o.partition("=")[0] for o in overrides}
    for item in sorted(overrides, key=lambda o: not o.partition("=")[0].endswith(".name")):
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise UserError(f"override {_quoted(item)} is not of the form key.path=value")
        if not raw.strip():  # `key=$UNSET` in a job script: never read as null, i.e. the default
            raise UserError(f"override {_quoted(item)} has no value (write {key}=null for none)")
        try:
            value = safe_load(raw)
        except yaml.YAMLError as err:
            raise UserError(f"override {_quoted(item)}: value is not valid YAML ({err})") from None
        if value is None and raw.strip() not in ("null", "Null", "NULL", "~"):  # e.g. `=#run1`
            raise UserError(f"override {_quoted(item)} reads as no value (a YAML comment?); quote "
                            f"it, or write {key}=null for none")
        if key == "sample" and isinstance(value, dict):
            value = named_sampler(value)
        *parents, leaf = key.split(".")
        for path in _leaves(tuple(key.split(".")), value):
            clash = next((k for k in seen if k[:len(path)] == path or path[:len(k)] == k), None)
            if clash is not None:
                raise UserError(f"override {_quoted(item)} sets {'.'.join(path)}, which "
                                f"{_quoted(seen[clash])} already set; give each key once")
            seen[path] = item
        node = data
        for i, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"override {_quoted(item)}: {'.'.join(parents[:i + 1])} is not a section")
            node = child
        if leaf == "name" and parents and node.get("name") not in (None, value):
            _say_dropped(item, {k: v for k, v in node.items()
                                if k != "name" and ".".join((*parents, k)) not in given})
            node.clear()  # another component: its own settings, not the old one's
        elif isinstance(value, dict) and isinstance(node.get(leaf), dict) and \
                value.get("name", node[leaf].get("name")) != node[leaf].get("name"):
            _say_dropped(item, {k: v for k, v in node[leaf].items()
                                if k not in value and ".".join((*parents, leaf, k)) not in given})
        node[leaf] = _merged(node.get(leaf), value)
    return data


def _say_dropped(item: str, dropped: dict) -> None:
    """Naming another component replaces its section: say which of the old settings go (an
    eps of 5e-5 would otherwise become the new component's default without a word)."""
    if dropped:
        from stcli.infra.console import warn

        warn(f"override {_quoted(item)} names another component, whose settings start from its "
             f"defaults: dropped {', '.join(f'{k}: {v}' for k, v in dropped.items())} (give them "
             "again to keep them)")


def named_sampler(section: dict) -> dict:
    """A sample section with the documented short form `sampler: pc` written `name: pc`."""
    if "sampler" in section and "name" not in section:
        return {"name": section["sampler"], **{k: v for k, v in section.items() if k != "sampler"}}
    return section


def _leaves(path: tuple[str, ...], value) -> list[tuple[str, ...]]:
    """The dotted keys an override of `path` with `value` sets (a mapping: each of its keys)."""
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaves((*path, str(k)), v)]
    return [path]


def _merged(old, new):
    """`new` merged into `old` where both are mappings of the same component; else `new`."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    if new.get("name", old.get("name")) != old.get("name"):
        return new
    return {**old, **{k: _merged(old.get(k), v) for k, v in new.items()}}


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key repeated in one mapping (instead of keeping the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.2's floats: `1e-5` and `2e30` are numbers (PyYAML, a YAML 1.1 reader, reads them as text)
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"), list("-+.0123456789"))


MAX_DEPTH = 32  # a recipe's sections and components nest 4 deep; a deeper value is a mistake


MAX_VALUES = 100_000  # the largest paper recipe holds about 100 values; aliases can multiply them


class TooDeep(yaml.YAMLError):
    def __str__(self) -> str:
        return f"nested more than {MAX_DEPTH} levels deep"


class TooLarge(yaml.YAMLError):
    def __str__(self) -> str:
        return f"more than {MAX_VALUES:,} values once its aliases (*name) are expanded"


def safe_load(text: str):
    """yaml.safe_load, refusing repeated keys and values nested deeper than MAX_DEPTH."""
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: builds plain data only
    except RecursionError:
        raise TooDeep() from None
    if _depth(data) > MAX_DEPTH:
        raise TooDeep()
    return data


def _depth(data) -> int:
    """How deep lists and mappings nest in `data` (iteratively: no recursion limit); TooLarge
    past MAX_VALUES values (an alias repeated in an alias repeated ...: a "billion laughs")."""
    deepest, stack, seen = 0, [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise TooLarge()
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH and isinstance(node, dict | list):
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _quoted(item: str, limit: int = 60) -> str:
    """An override as a message quotes it (at most `limit` characters)."""
    return repr(item if len(item) <= limit else item[:limit] + "...")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"recipe {path} is a folder, not a YAML file")
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"recipe {path} is not UTF-8 text (byte {err.start}); is it a binary "
                        "file?") from None
    except OSError as err:
        raise UserError(f"cannot read recipe {path}: {err}") from None
    if "\0" in text:
        raise UserError(f"recipe {path} is a binary file, not YAML")
    try:
        data = safe_load(text)
    except TooDeep as err:
        raise UserError(f"recipe {path} is {err}") from None
    except TooLarge as err:
        raise UserError(f"recipe {path} holds {err}") from None
    except yaml.YAMLError as err:
        raise UserError(f"recipe {path} is not valid YAML:\n{err}") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of sections (name, data, sde, net, ...)")
    return data


def parse_recipe(data: dict, source: str = "recipe") -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise UserError(f"{source} is invalid:\n" + format_validation_error(err, data=data)) from None
    check = getattr(recipe.net, "check_shape", None)  # the net's shapes, without building it
    if check is not None:
        try:
            check(recipe.data.shape)
        except UserError as err:
            raise UserError(f"{source} is invalid:\nnet: {err}") from None
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    return parse_recipe(data, source=f"recipe {path}")
