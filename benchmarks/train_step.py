"""Images/s and peak memory of one training step of NCSN++ and DDPM++, for each speed option.

One step is what ``stcli.jobs.train.Trainer`` does per batch: the Soft Truncation loss (likelihood
weighting, importance-sampled t) forward and backward, gradient clipping, Adam, and the EMA
update.  Every option runs in this one process and is compared with the plain fp32 eager run of
the same net and width (``ratio`` = its images/s over the baseline's):

    fp32 eager       strict fp32 (no TF32), NCHW, Adam's per-tensor loop
    default          what ``train.py`` runs with a default recipe: fused Adam, and on CUDA TF32
                     matmuls/convolutions and channels_last (``train.tf32``, ``train.channels_last``)
    tf32             ``train.tf32: true`` alone (CUDA only; TF32 has no meaning on CPU)
    channels_last    ``train.channels_last: true`` (model and batch in NHWC)
    bf16 autocast    ``train.precision: bf16``
    torch.compile    ``train.compile: true`` (the forward; compile time is reported apart)
    fused Adam       ``torch.optim.Adam(fused=True)`` (not a recipe option; see docs/performance.md)
    score_sde        with ``--score-sde PATH``: score_sde's own training iteration (its model code,
                     CIFAR-10 config at the same width, loss, Adam and EMA) from a local checkout
                     of score_sde_pytorch (``benchmarks/score_sde_reference.py``)

Peak memory: on CUDA the allocator's peak above the memory held before the step; on CPU the
growth of the resident set during the step (the kernel's high-water mark, reset before it).
Gradients are dropped before each step, so its peak counts them whichever loop keeps them.

    python benchmarks/train_step.py                       # CIFAR-10 width (nf 128) and nf 32
    python benchmarks/train_step.py --nf 32 --batch 8 --skip-compile --threads 1
    python benchmarks/train_step.py --nets ddpmpp --nf 128 --options "fp32 eager" default \
        --skip-compile --score-sde ../score_sde_pytorch       # st against score_sde's own step
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import statistics
import time
from dataclasses import dataclass

import torch
from score_sde_reference import ScoreSdeStep
from score_sde_reference import load as load_score_sde

from stcli.components.losses import ScoreMatchingLoss
from stcli.components.nets import ScoreModel
from stcli.components.recipe import Train
from stcli.infra.registry import NETS, SDES
from stcli.jobs.train import cuda_fast_path

OPTIONS = ("fp32 eager", "default", "tf32", "channels_last", "bf16 autocast", "torch.compile",
           "fused Adam")
CUDA_ONLY = ("tf32",)


@dataclass
class Result:
    net: str
    nf: int
    option: str
    images_per_s: float
    peak_mib: float
    trainable: int
    compile_s: float = 0.0


class PeakRSS:
    """Peak growth of the resident set while the context is open (CPU memory, Linux).

    Resets the kernel's high-water mark (``/proc/self/clear_refs``), so no polling thread
    competes with the OpenMP workers; a lower bound when freed memory is reused.
    """

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(key))
        return int(line.split()[1]) * 1024

    def __enter__(self):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        self.base, self.peak = self._status("VmRSS"), 0
        return self

    def __exit__(self, *exc):
        self.peak = self._status("VmHWM") - self.base


class Step:
    """One optimisation step of a fresh ScoreModel, as train.py performs it."""

    def __init__(self, name: str, nf: int, batch: int, option: str, device: torch.device):
        torch.manual_seed(0)
        spec = NETS.validate(name, nf=nf)
        self.sde = SDES.build("vp") if name == "ddpmpp" else SDES.build("ve", sigma_max=50.0)
        self.model = ScoreModel(spec.create(shape=(3, 32, 32)), self.sde, spec.time_input)
        self.model.to(device).train()
        self.x0 = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
        default = option == "default"
        self.cfg, self.device = Train(tf32=default or option == "tf32", channels_last=None if default
                                      else option == "channels_last"), device
        if cuda_fast_path(self.cfg, device):
            self.model.to(memory_format=torch.channels_last)
            self.x0 = self.x0.contiguous(memory_format=torch.channels_last)
        self.params = list(self.model.parameters())
        self.ema = [p.detach().clone() for p in self.params]
        self.optimizer = torch.optim.Adam(self.params, lr=2e-4, fused=option in ("fused Adam", "default"))
        self.forward = torch.compile(self.model) if option == "torch.compile" else self.model
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                       enabled=option == "bf16 autocast")
        self.loss = ScoreMatchingLoss(reduce="sum")
        self.generator = torch.Generator(device).manual_seed(0)

    def __call__(self) -> None:
        cuda_fast_path(self.cfg, self.device)  # global flags: set for this option's step
        with self.autocast:
            losses = self.loss(self.forward, self.sde, self.x0, 1e-5, generator=self.generator)
            (losses.sum() / len(self.x0)).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        torch._foreach_lerp_(self.ema, self.params, 1 - 0.999)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(step: Step, device: torch.device) -> tuple[float, int]:
    """Seconds and peak memory (bytes) of one step.  Gradients are dropped first, so a loop that
    frees them after its update (train.py) and one that keeps them until its next ``zero_grad``
    (score_sde, whose step begins with it) both count them in the step's peak."""
    for p in step.model.parameters():
        p.grad = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        step()
        sync(device)
        seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - held if device.type == "cuda" else rss.peak
    return seconds, peak


def profile(steps: dict, device: torch.device, reps: int, top: int) -> str:
    """Self time per operator (ms per step, mean of ``reps`` profiled steps) of each option,
    the ``top`` costliest operators over all options, as a table."""
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ms = {}
    for option, step in steps.items():
        for _ in range(reps):
            with torch.profiler.profile(activities=activities) as prof:
                step()
                sync(device)
            for e in prof.key_averages():
                own = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
                ms.setdefault(e.key, dict.fromkeys(steps, 0.0))[option] += own / 1e3 / reps
    ops = sorted(ms, key=lambda k: -max(ms[k].values()))[:top]
    total = {o: sum(v[o] for v in ms.values()) for o in steps}
    lines = ["| operator | " + " | ".join(f"{o} ms" for o in steps) + " |",
             "|---|" + "---|" * len(steps),
             "| all operators | " + " | ".join(f"{total[o]:,.1f}" for o in steps) + " |"]
    lines += [f"| `{k}` | " + " | ".join(f"{ms[k][o]:,.1f}" for o in steps) + " |" for k in ops]
    return "\n".join(lines)


def measure(name: str, nf: int, batch: int, options: list[str], reps: int, device,
            score_sde=None, top: int = 0) -> list[Result]:
    """Every option of one net and width; repetitions interleaved across options, in an order
    rotated each time, so that load from other processes on a shared machine hits all of them
    alike (medians are kept).  With ``top``, also prints an operator profile of each option."""
    steps, compile_s = {}, {}
    for option in options:
        steps[option] = (ScoreSdeStep(score_sde, name, nf, batch, device) if option == "score_sde"
                         else Step(name, nf, batch, option, device))
        t0 = time.perf_counter()
        steps[option]()  # warm-up: primitive caches, compilation, Adam state
        sync(device)
        compile_s[option] = time.perf_counter() - t0 if option == "torch.compile" else 0.0
    times, peaks = {o: [] for o in options}, {o: 0 for o in options}
    for rep in range(reps):
        for option in options[rep % len(options):] + options[:rep % len(options)]:
            seconds, peak = timed_step(steps[option], device)
            times[option].append(seconds)
            peaks[option] = max(peaks[option], peak)
    if top:
        print(f"\n{name} nf {nf}, batch {batch}: self time per operator\n"
              f"{profile(steps, device, reps, top)}\n", flush=True)
    trainable = {o: sum(p.numel() for p in steps[o].model.parameters() if p.requires_grad)
                 for o in options}
    return [Result(name, nf, o, batch / statistics.median(times[o]), peaks[o] / 2**20,
                   trainable[o], compile_s[o]) for o in options]


def table(results: list[Result]) -> str:
    base = {(r.net, r.nf): r.images_per_s for r in results if r.option == "fp32 eager"}
    lines = ["| net | nf | trainable parameters | option | images/s | ratio | peak MiB | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = r.images_per_s / base[(r.net, r.nf)]
        comp = f"{r.compile_s:.0f}" if r.compile_s else ""
        lines.append(f"| {r.net} | {r.nf} | {r.trainable:,} | {r.option} | {r.images_per_s:.2f} | "
                     f"{ratio:.2f} | {r.peak_mib:.0f} | {comp} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["ddpmpp", "ncsnpp"])
    parser.add_argument("--nf", nargs="+", type=int, default=[128, 32],
                        help="widths: 128 is the CIFAR-10 configuration")
    parser.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 128 on CUDA")
    parser.add_argument("--reps", type=int, default=3, help="timed steps (the median is kept)")
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--score-sde", metavar="PATH", default=None,
                        help="a score_sde_pytorch checkout: add its own training step as a row")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="also print the TOP costliest operators of each option (torch.profiler)")
    args = parser.parse_args(argv)
    try:
        score_sde = load_score_sde(args.score_sde) if args.score_sde else None
    except ValueError as e:
        parser.error(f"--score-sde {e}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (128 if device.type == "cuda" else 2)
    options = [o for o in args.options if not (args.skip_compile and o == "torch.compile")
               and not (device.type != "cuda" and o in CUDA_ONLY)]
    threads = torch.get_num_threads()
    print(f"# {device} ({threads} threads), batch {batch}, torch {torch.__version__}")
    options = ["fp32 eager"] + [o for o in options if o != "fp32 eager"] + ["score_sde"] * bool(score_sde)
    results = []
    for name in args.nets:
        for nf in args.nf:
            results += measure(name, nf, batch, options, args.reps, device, score_sde, args.profile)
            print(f"# {name} nf {nf}: done", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
