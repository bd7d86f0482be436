"""Worked examples shown at the end of `st COMMAND --help` (the test suite parses every one)."""

from __future__ import annotations

EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "train": [
        ("st train recipes/quickstart_digits.yaml", "minutes on a CPU"),
        ("st train recipes/quickstart_digits.yaml train.steps=500 optim.lr=1e-3", "dotted overrides"),
        ("st train recipes/quickstart_digits.yaml --resume train.steps=2000",
         "continue (bit-exact) and train longer"),
        ("st train runs/quickstart_digits train.steps=2000 train.workers=4",
         "continue a run folder from its recipe.yaml (run settings may change)"),
        ("st train recipes/cifar10_ddpmpp_vp_nll_st.yaml --procs 8", "8 GPUs of this node"),
        ("srun --ntasks-per-node=8 st train recipes/cifar10_ddpmpp_vp_nll_st.yaml",
         "under Slurm (N nodes x 8 GPUs): see examples/slurm/train.sbatch"),
    ],
    "sample": [
        ("st sample runs/digits/ckpt.safetensors -n 64 --out samples/digits", "the recipe's sampler"),
        ("st sample runs/digits/ckpt.safetensors -n 1000 --sampler heun --steps 18",
         "Heun on EDM's grid, 18 steps (37 NFE)"),
        ("st sample runs/c10/ckpt.safetensors -n 50000 --format npz --procs 8",
         "8 processes; resumable, image i depends only on i and --seed"),
    ],
    "tune-steps": [
        ("st tune-steps runs/digits/ckpt.safetensors --steps 10 --out unipc10.yaml",
         "a 10-step unipc grid for this model"),
        ("st sample runs/digits/ckpt.safetensors -n 1000 --sampler-file unipc10.yaml",
         "sample on it"),
    ],
    "nll": [
        ("st nll runs/digits/ckpt.safetensors --limit 256", "a quick estimate"),
        ("st nll runs/c10/ckpt.safetensors --nelbo --json nll.json --procs 8",
         "bits/dim by the ODE and the NELBO, as in the paper"),
    ],
    "fid": [
        ("st fid samples/c10 --ref cifar10-train", "a folder of images against the CIFAR-10 train set"),
        ("st fid runs/c10/ckpt.safetensors -n 50000 --kid --json fid.json",
         "sample 50k from a checkpoint, then measure"),
        ("st fid samples.npz --ref stats/c10.safetensors", "against statistics written by st fid-ref"),
    ],
    "import": [
        ("st import c.pth --recipe recipes/cifar10_ncsnpp_ve_var.yaml --out ve.st",
         "a score_sde / Soft Truncation release as an st checkpoint (safetensors)"),
    ],
    "export": [
        ("st export runs/c10/ckpt.safetensors --out model.safetensors --dtype fp16",
         "inference weights only (EMA), half precision"),
    ],
}

DOCS = {"train": "docs/training.md", "sample": "docs/sampling.md",
        "tune-steps": "docs/sampling.md", "nll": "docs/likelihood.md",
        "fid": "docs/evaluation.md", "import": "docs/checkpoints.md", "export": "docs/checkpoints.md"}


def epilog(command: str) -> str:
    """The examples of `command`, each after its comment line, and where the docs are."""
    lines = [line for cmd, note in EXAMPLES[command] for line in (f"  # {note}", f"  {cmd}")]
    return "Examples:\n" + "\n".join(lines) + f"\n\nMore: {DOCS[command]}"
