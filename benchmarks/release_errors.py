"""Per fixture and public t, the max relative error per image of `st import` against the Soft
Truncation release's own scores (tests/fixtures/st_official), EMA and raw, and with the recipe
as is (`--as-recipe`) where that imports:

    python benchmarks/release_errors.py
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_releases import RELEASES, per_image_rel_err, pth, public_io, recipe_of  # noqa: E402

from stcli.components.loading import load_model  # noqa: E402
from stcli.infra.errors import UserError  # noqa: E402
from stcli.jobs import importer  # noqa: E402


def errors(path: Path, io: dict, weights: str, key: str) -> torch.Tensor:
    with torch.no_grad():
        return per_image_rel_err(load_model(path, weights).model.score(io["x"], io["t"]), io[key])


def main() -> None:
    root = Path(tempfile.mkdtemp())
    print("| fixture | t | EMA | raw | recipe as is (EMA) |\n|---|---|---|---|---|")
    for name in RELEASES:
        io, out, kept = public_io(name), root / f"{name}.safetensors", root / f"{name}_recipe.safetensors"
        importer.import_checkpoint(pth(name), recipe_of(name), out)
        cols = [errors(out, io, "ema", "score"), errors(out, io, "raw", "score_raw")]
        try:
            importer.import_checkpoint(pth(name), recipe_of(name), kept, as_recipe=True)
            cols.append(errors(kept, io, "ema", "score"))
        except UserError as err:
            cols.append(f"refused: {err}")
        for i, t in enumerate(io["t"].tolist()):
            cells = [f"{c[i]:.1e}" if isinstance(c, torch.Tensor) else c for c in cols]
            print(f"| {name} | {t:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
