"""`st sample CKPT -n N`: draw N samples from a checkpoint, sharded across ranks and resumable.

Image i is a function of (seed, i) alone: its prior draw and every noise draw of every step
come from its own generator, seeded by (seed, "sample", i), and the samplers keep samples
independent of their batch (per-sample Langevin norms, per-sample ODE step sizes).  So image
i is the same whatever the batch size or the number of processes, a crashed run resumes by
skipping the images already on disk, and ranks simply split the missing indices.

Images go to ``out/<first index of its 1,000>/<index>.png`` (EDM's layout), each written to a
temporary file and renamed.  ``fmt="npz"`` writes one ``samples.npz`` instead (``arr_0``:
uint8 (N, H, W, C), the layout of OpenAI's evaluator; float32 (N, ...) for non-image data);
it is written once at the end, so it resumes only when complete.  ``grid.png`` shows the
first 64 images (for non-image data: the picture of all samples).

``manifest.json`` records how the folder's images were made: the checkpoint's content hash
(sha256 of the file) and step, the weights, the sampler with all its settings, the seed, the
count, the format, the precision and the st version.  A run into a folder that already holds
samples resumes only under the same manifest; anything else is refused naming the field that
differs (``overwrite=True`` deletes the old samples and starts afresh).
"""

from __future__ import annotations

import json
import math
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from stcli.components.loading import load_model
from stcli.components.samplers import Sampler
from stcli.components.samplers.base import GridSampler
from stcli.infra import checkpoint, distributed
from stcli.infra.console import StepProgress, fmt_eta, info
from stcli.infra.errors import UserError
from stcli.infra.images import save_grid
from stcli.infra.outputs import refuse_foreign
from stcli.infra.registry import SAMPLERS
from stcli.infra.runlock import TMP_PREFIX, RunLock, atomic, remove_temporaries
from stcli.infra.seeding import seed_for
from stcli.infra.version import __version__
from stcli.jobs.resources import check_disk

PER_FOLDER = 1000
GRID = 64
MIN_ROWS = 16  # network batches are padded to at least this many rows (see Job.score)
NPZ = "samples.npz"
MANIFEST = "manifest.json"
SOURCES = "sampler_from"  # in the manifest: where each sampler setting came from (not compared)
PNG_OVERHEAD = 128  # bytes of a PNG's signature, chunks and file-system slack, per image
MANIFEST_KIND = "st-samples/1"


def grid_share(n: int, ctx: distributed.Context) -> range:
    """The rows of an n-image sample grid that rank `ctx.rank` draws (contiguous, in rank order)."""
    return range(n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size)


def padded_score(score):
    """`score` on batches padded to MIN_ROWS rows (copies of the first): CPU BLAS switches
    kernels for a few rows, so unpadded a row's output would depend on its batch's size."""
    def padded(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        k = x.shape[0]
        if k < MIN_ROWS:
            x = torch.cat([x, x[:1].expand(MIN_ROWS - k, *x.shape[1:])])
            t = torch.cat([t, t[:1].expand(MIN_ROWS - k)])
        return score(x, t)[:k]

    return padded


def generate(ckpt: str | Path, n: int, out: str | Path, *, sampler: dict | None = None,
             batch_size: int = 256, seed: int = 0, weights: str = "ema", fmt: str = "png",
             device: str = "auto", precision: str = "fp32", overwrite: bool = False) -> Path:
    """Write n samples of checkpoint `ckpt` into folder `out` and return `out`.

    `sampler` overrides the recipe's `sample:` section (e.g. {"name": "ode", "rtol": 1e-3}).
    Under torchrun every rank takes its share of the missing indices.  A folder holding
    samples made otherwise (see ``manifest.json``) is refused unless `overwrite`.
    """
    out = Path(out)
    _check(n, batch_size, weights, fmt, precision, out)
    owns_group = not distributed.is_initialized()
    ctx = distributed.setup(device)
    try:
        with distributed.checked(ctx, "read its inputs"):
            loaded = load_model(ckpt, weights, ctx.device)
            check_disk(n, math.prod(loaded.recipe.data.resolved().shape) + PNG_OVERHEAD, out,
                       f"{n:,} samples")
            spec = resolve_sampler(loaded.recipe.sample, sampler or {})
            spec.check(loaded.recipe.sde)
            sources = sampler_sources(loaded.recipe.sample, sampler or {}, spec)
            manifest = make_manifest(ckpt, loaded.step, loaded.weights, spec, seed, n, fmt, precision)
        if ctx.is_main:
            info(f"sampler {describe_sampler(spec, sources)}")
        distributed.same_everywhere(json.dumps(manifest, sort_keys=True), ctx, "sampling settings")
        manifest[SOURCES] = sources
        Job(loaded, spec, ctx, out, n, batch_size, seed, fmt, precision, manifest, overwrite).run()
    finally:
        if owns_group:
            distributed.teardown()
    return out


def _check(n: int, batch_size: int, weights: str, fmt: str, precision: str, out: Path) -> None:
    choices = {"weights": (weights, ("ema", "raw")), "format": (fmt, ("png", "npz")),
               "precision": (precision, ("fp32", "bf16"))}
    for option, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"--{option} must be one of {', '.join(allowed)}, got {value!r}")
    if n <= 0:
        raise UserError(f"the number of samples -n must be positive, got {n}")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if out.exists() and not out.is_dir():
        raise UserError(f"the output path {out} exists and is not a folder")


def read_sampler_file(path: str | Path) -> dict[str, Any]:
    """The sampler section in YAML file `path` (a mapping that names the sampler)."""
    import yaml

    from stcli.components.recipe import safe_load

    try:
        data = safe_load(Path(path).read_text())
    except OSError as err:
        raise UserError(f"--sampler-file {path}: cannot read it ({err.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"--sampler-file {path} is not YAML ({err})") from None
    if isinstance(data, dict) and isinstance(data.get("sample"), dict):
        data = data["sample"]  # a whole recipe: its sampler
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise UserError(f"--sampler-file {path} must hold a sampler section: a mapping with its "
                        "`name` (e.g. name: unipc) and settings")
    return data


def resolve_sampler(recipe_sample: Sampler, overrides: dict[str, Any]) -> Sampler:
    """The sampler `overrides` ask for.  The recipe's own sampler keeps the recipe's settings
    under the overrides; another sampler starts from its own defaults (its steps and grid), so
    no setting of the recipe's sampler leaks into it."""
    name = overrides.get("name", recipe_sample.name)
    fields = SAMPLERS.spec(name).model_fields
    unknown = sorted(k for k in overrides if k not in fields)
    if unknown:
        raise UserError(f"sampler {name!r} has no option {', '.join(unknown)}; its options: "
                        f"{', '.join(k for k in fields if k != 'name')}")
    base = recipe_sample.model_dump() if name == recipe_sample.name else {}
    if overrides.get("times") is not None:  # explicit times: the recipe's grid gives way
        base = {k: v for k, v in base.items() if k not in ("steps", "schedule", "rho")}
    elif base.get("times") is not None and {"steps", "schedule", "rho"} & overrides.keys():
        base["times"] = None  # another grid asked for: the recipe's explicit times give way
    params = {k: v for k, v in {**base, **overrides}.items() if k in fields and k != "name"}
    spec = SAMPLERS.validate(name, **params)
    defaults = type(spec).model_fields
    unused = {k: why for k, why in spec.ignored().items()  # a default value there changes nothing
              if k in overrides and overrides[k] != defaults[k].default}
    if unused:
        raise UserError(f"sampler {name!r}: {', '.join(unused)} would have no effect "
                        f"({'; '.join(dict.fromkeys(unused.values()))}); drop "
                        f"{'it' if len(unused) == 1 else 'them'}")
    return spec


def sampler_sources(recipe_sample: Sampler, overrides: dict[str, Any], spec: Sampler) -> dict[str, str]:
    """Where each setting of `spec` comes from: "option" (given by the user), "recipe" (the
    checkpoint's recipe names this sampler) or "default" (the sampler's own)."""
    same = spec.name == recipe_sample.name
    return {k: "option" if k in overrides else "recipe" if same else "default"
            for k in type(spec).model_fields if k != "name"}


def describe_sampler(spec: Sampler, sources: dict[str, str]) -> str:
    """One line: the sampler and each setting with its source, e.g. "dpm2m: steps 20 (default)"."""
    values = spec.model_dump(mode="json")
    hidden = ("schedule", "rho") if values.get("times") is not None else ()  # times set the grid
    return f"{spec.name}: " + ", ".join(f"{k} {json.dumps(values[k])} ({sources[k]})" for k in sources
                                        if values.get(k) is not None and k not in hidden)


def make_manifest(ckpt: str | Path, step: int, weights: str, spec: Sampler, seed: int, n: int,
                  fmt: str, precision: str) -> dict:
    """Everything the images of a sample folder depend on (the batch size and the number of
    processes do not: image i is a function of the seed and i)."""
    return {"kind": MANIFEST_KIND, "checkpoint_sha256": checkpoint.file_sha256(ckpt), "checkpoint_step": step,
            "weights": weights, "sampler": spec.model_dump(mode="json"), "seed": seed, "count": n,
            "format": fmt, "precision": precision, "st_version": __version__}


def read_manifest(out: Path) -> dict | None:
    """The manifest of sample folder `out`, or None if it has none."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"the sample manifest {path} is damaged ({err}); pass --overwrite to "
                        "start afresh") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        raise UserError(f"{path} is not a manifest of `st sample`; use another folder")
    return manifest


def manifest_difference(old: dict, new: dict) -> str | None:
    """The first field (dotted, e.g. ``sampler.steps``) whose value differs, with both values."""
    for key in dict.fromkeys([*new, *old]):
        if key == SOURCES:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = manifest_difference(a, b)
            if inner:
                return f"{key}.{inner}"
        elif a != b:
            return f"{key} ({a!r} there, {b!r} requested)"
    return None


def sample_files(out: Path) -> list[Path]:
    """What `st sample` writes into `out` (the files --overwrite deletes)."""
    found = [p for p in (out / NPZ, out / "grid.png", out / MANIFEST) if p.is_file()]
    folders = [d for d in out.glob("[0-9]" * 6) if d.is_dir()]
    return found + [p for d in folders for p in d.glob("[0-9]" * 6 + ".png")] + folders


def check_manifest(out: Path, manifest: dict, overwrite: bool) -> None:
    """Refuse a folder of samples made otherwise; delete them under `overwrite`; then record
    `manifest`.  Runs on the main process, with the folder locked."""
    old, files = read_manifest(out), sample_files(out)
    hint = "use another folder, or delete them and start afresh with `st sample --overwrite`"
    if old is None and not overwrite:  # the user's folder (--overwrite keeps those files)
        refuse_foreign(out, {p.name for p in files if p.parent == out},
                       f"{out} holds files st sample did not write ({{files}}); choose a new or empty folder")
    if overwrite and (old or files):
        for path in files:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        info(f"--overwrite: deleted the previous samples in {out}")
    elif old is not None:
        # more PNGs of the same draw extend the folder: image i depends on the seed and i only
        grows = old.get("format") == manifest["format"] == "png" and \
            isinstance(old.get("count"), int) and manifest["count"] > old["count"]
        diff = manifest_difference({**old, "count": manifest["count"]} if grows else old, manifest)
        if diff:
            raise UserError(f"{out} holds samples made with another {diff}; {hint}")
        if grows:
            info(f"{out}: extending {old['count']:,} samples to {manifest['count']:,}")
    elif files:
        raise UserError(f"{out} holds samples without a manifest ({MANIFEST}), so how they "
                        f"were made is unknown; {hint}")
    if read_manifest(out) != manifest:
        with atomic(out / MANIFEST) as tmp:
            Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n")


def image_path(out: Path, i: int) -> Path:
    return out / f"{i - i % PER_FOLDER:06d}" / f"{i:06d}.png"


def image_generators(seed: int, indices: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per image, seeded by (seed, "sample", i)."""
    return [torch.Generator(device=device).manual_seed(seed_for(seed, "sample", i)) for i in indices]


def write_png(array: np.ndarray, path: Path) -> None:
    """Atomically write a uint8 (H, W, C) array as PNG (temporary file, then rename)."""
    with atomic(path) as tmp:
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(tmp, format="PNG")


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"sample image {path} is damaged ({err}); delete it and run the same "
                        "command again to draw it anew") from None


def readable_image(path: Path) -> bool:
    """Whether `path` is a complete, undamaged image (a killed or damaged write is not)."""
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


@dataclass
class Job:
    loaded: Any
    spec: Sampler
    ctx: distributed.Context
    out: Path
    n: int
    batch_size: int
    seed: int
    fmt: str
    precision: str
    manifest: dict | None = None  # checked against and written to out/MANIFEST (None: neither)
    overwrite: bool = False

    def __post_init__(self):
        self.data, self.sde, self.model = (self.loaded.recipe.data, self.loaded.recipe.sde,
                                           self.loaded.model)
        self.images = self.data.is_image
        self.per_file = self.images and self.fmt == "png"  # else: collected into one file
        self.grid_nfe = self._grid_nfe()

    def _grid_nfe(self) -> int | None:
        """A fixed grid's evaluations per batch, known before the first (None: adaptive, or a
        plugin grid sampler the count cannot be run on: the count is for progress only)."""
        if not isinstance(self.spec, GridSampler):
            return None
        try:
            return self.spec.nfe(self.sde)
        except Exception:  # noqa: BLE001 -- sampling itself says what is wrong, if anything
            return None

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's score, batches of fewer than MIN_ROWS padded with copies of their first
        row: CPU BLAS switches kernels (and summation order) for a few rows (gemv for one), so
        unpadded, a sample's float output would depend on the size of its batch."""
        k = x.shape[0]
        if k < MIN_ROWS:
            x = torch.cat([x, x[:1].expand(MIN_ROWS - k, *x.shape[1:])])
            t = torch.cat([t, t[:1].expand(MIN_ROWS - k)])
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.model.score(x, t).float()[:k]

    def sample(self, indices: list[int], progress: StepProgress | None = None
               ) -> tuple[torch.Tensor, int]:
        """Samples of `indices` (x_T drawn first from each image's generator) and the NFE."""
        gens = image_generators(self.seed, indices, self.ctx.device)
        x = torch.stack([self.sde.prior_sample(self.data.shape, generator=g, device=self.ctx.device)
                         for g in gens])
        score = progress.beating(self.score, self.grid_nfe) if progress else self.score
        return self.spec(score, self.sde, x, generator=gens)

    def missing(self) -> list[int]:
        if self.per_file:
            todo = [i for i in range(self.n) if not image_path(self.out, i).exists()]
            absent = set(todo)
            damaged = [i for i in range(self.n)
                       if i not in absent and not readable_image(image_path(self.out, i))]
            if damaged and self.ctx.is_main:
                info(f"warning: {len(damaged)} image(s) in {self.out} are damaged (e.g. "
                     f"{image_path(self.out, damaged[0])}): drawing them again")
            return sorted(todo + damaged)
        final = self.out / (NPZ if self.fmt == "npz" else "grid.png")
        return [] if final.exists() and self._complete(final) else list(range(self.n))

    def _complete(self, path: Path) -> bool:
        if path.suffix != ".npz":
            return False  # a picture of all samples cannot tell how many it holds: redo it
        try:
            with np.load(path, allow_pickle=False) as f:
                return f["arr_0"].shape[0] == self.n
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # damaged: draw it again
            return False

    def run(self) -> None:
        lock = RunLock(self.out, "st sample") if self.ctx.is_main else None
        fresh = False  # this run wrote the folder's manifest
        try:
            with distributed.checked(self.ctx, "lock the output folder"):
                if lock:
                    lock.acquire()
                    if self.manifest is not None:
                        fresh = read_manifest(self.out) is None
                        check_manifest(self.out, self.manifest, self.overwrite)
            self._run()
        except BaseException:
            # failed before its first image: no manifest left to refuse the next, other run
            if fresh and sample_files(self.out) == [self.out / MANIFEST]:
                (self.out / MANIFEST).unlink(missing_ok=True)
            raise
        finally:
            if lock:
                lock.release()

    def _run(self) -> None:
        ctx, t0 = self.ctx, time.perf_counter()
        if ctx.is_main and remove_temporaries(self.out, depth=2):
            info(f"removed temporary files left in {self.out} by an interrupted run")
        distributed.barrier()
        todo = self.missing()
        distributed.barrier()  # every rank has listed the missing images before any is written
        mine = todo[ctx.rank::ctx.world_size]
        if ctx.is_main:
            per_image = "" if self.grid_nfe is None else f" ({self.grid_nfe:,} NFE per image)"
            info(f"sampling {len(todo)} of {self.n} images ({self.n - len(todo)} already in "
                 f"{self.out}) with {self.spec.name}{per_image} on {ctx.device} x "
                 f"{ctx.world_size} process(es)")
        done, nfe, batches, collected = 0, 0, 0, []
        with distributed.checked(ctx, "draw its share of the images"), \
                StepProgress("sample", len(todo), enabled=ctx.is_main) as progress:
            for lo in range(0, len(mine), self.batch_size):
                batch = mine[lo:lo + self.batch_size]
                x, batch_nfe = self.sample(batch, progress)
                self.store(batch, x, collected)
                done, nfe, batches = done + len(batch), nfe + batch_nfe, batches + 1
                self.report(progress, done, len(mine), batch_nfe, time.perf_counter() - t0)
        totals = distributed.all_reduce_sum(torch.tensor([done, nfe, batches], dtype=torch.float64))
        if not self.per_file:
            self.merge(collected)
        distributed.barrier()
        if ctx.is_main:
            self.write_grid()
            wall = time.perf_counter() - t0
            images, calls, batches = (int(v) for v in totals.tolist())
            per_image = f" ({calls / batches:.1f} per image)" if batches else ""
            info(f"done: {images} images written to {self.out} in {wall:.1f} s "
                 f"({images / wall:.2f} images/s); total NFE {calls} batched network "
                 f"evaluations{per_image}")

    def report(self, progress: StepProgress, done: int, total: int, nfe: int, elapsed: float):
        world, rate = self.ctx.world_size, done * self.ctx.world_size / elapsed
        stats = {"images/s": f"{rate:.2f}", "NFE": str(nfe)}
        if not progress.live:
            stats["eta"] = fmt_eta((total - done) * world / rate)
        progress.update(min(done * world, progress.total), stats, force=done == total)

    def store(self, indices: list[int], x: torch.Tensor, collected: list) -> None:
        if not self.images:
            collected.append((indices, x.float().cpu().numpy()))
            return
        pixels = self.data.to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
        if not self.per_file:
            collected.append((indices, pixels))
            return
        for i, array in zip(indices, pixels):
            path = image_path(self.out, i)
            path.parent.mkdir(exist_ok=True)
            write_png(array, path)

    def merge(self, collected: list) -> None:
        """Each rank writes its part; rank 0 orders them by index into the final file."""
        part = self.out / f"{TMP_PREFIX}part-{self.ctx.rank}.npz"
        idx = np.array([i for ids, _ in collected for i in ids], dtype=np.int64)
        arrays = [a for _, a in collected]
        write_npz(part, idx=idx, x=np.concatenate(arrays) if arrays else np.zeros((0,)))
        distributed.barrier()
        if not self.ctx.is_main:
            return
        parts = [self.out / f"{TMP_PREFIX}part-{r}.npz" for r in range(self.ctx.world_size)]
        loaded = [np.load(p) for p in parts]
        idx = np.concatenate([f["idx"] for f in loaded])
        xs = np.concatenate([f["x"] for f in loaded if f["idx"].size])
        samples = xs[np.argsort(idx)]
        if self.fmt == "npz":
            write_npz(self.out / NPZ, arr_0=samples)
        if not self.images:
            save_grid(self.data.picture(torch.from_numpy(samples)), self.out / "grid.png")
        for f, p in zip(loaded, parts):
            f.close()
            p.unlink()

    def write_grid(self) -> None:
        if not self.images:
            return
        k = min(self.n, GRID)
        if self.per_file:
            arrays = [read_png(image_path(self.out, i)) for i in range(k)]
            arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
        else:
            with np.load(self.out / NPZ) as f:
                arrays = list(f["arr_0"][:k])
        save_grid(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), self.out / "grid.png")
