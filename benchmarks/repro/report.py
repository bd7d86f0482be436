"""Tables of the reproduction: mean ± standard error over seeds for every (data set, loss), and
the paired differences to vanilla likelihood weighting L(θ; g², ε) (same seed, same test items).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

TOY2D = (("nll", "NLL (bpd)", 1), ("nelbo", "NELBO (bpd)", 1), ("kl", "NLL − H(p) (bpd)", 1),
         ("mmd2_h0.1", "MMD² h=0.1 (×10³)", 1e3), ("mmd2_h1", "MMD² h=1 (×10³)", 1e3))
COLUMNS = {  # data set -> (result key, header, scale); the first sampler's score has no suffix
    "digits": (("nll", "NLL (bpd)", 1), ("nelbo", "NELBO (bpd)", 1), ("fid", "FID Heun 35 NFE", 1),
               ("fid_em", "FID EM 251 NFE", 1)),
    "toy2d": (*TOY2D[:3], ("mmd2_h0.1", "MMD² h=0.1 Heun (×10³)", 1e3),
              ("mmd2_h1", "MMD² h=1 Heun (×10³)", 1e3), ("mmd2_h0.1_em", "MMD² h=0.1 EM (×10³)", 1e3),
              ("mmd2_h1_em", "MMD² h=1 EM (×10³)", 1e3)),
    "toy2d_stf": TOY2D,  # the short runs: one sampler (Heun, 50 steps)
    "toy2d_eps": TOY2D,
}
BASELINE = "g2"
# the other comparisons of the paper's claims: ST against the reweighting it equals in
# expectation (Eq. (10)), neighbouring P_k (Table 7), ST on the variance weighting (Table 5)
OTHER_PAIRS = (("st_P1", "g2P1"), ("st_P0.9", "st_P1"), ("st_P2", "st_P1"), ("st_P0", "st_P1"),
               ("var_st_P1", "var"))


def scalar(result: dict, key: str) -> float:
    """One number per run: the mean of NLL/NELBO rows, or the score itself."""
    if key == "kl":
        return result["nll"]["mean"] - result["data_entropy_bpd"]
    value = result[key]
    return value["mean"] if isinstance(value, dict) else value


def mean_se(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "se": se, "n": len(v)}


def aggregate(results: list[dict]) -> dict[str, list[dict]]:
    """Per data set, one row per loss (in the order met): label, tables, {key: mean_se}."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["data"], r["variant"])].append(r)
    rows: dict[str, list[dict]] = defaultdict(list)
    for (data, variant), runs in groups.items():
        runs.sort(key=lambda r: r["seed"])
        row = {"variant": variant, "label": runs[0]["label"], "seeds": [r["seed"] for r in runs],
               "cpu": all("train_cpu_s" in r for r in runs),
               "steps": sorted({r["recipe"]["train"]["steps"] for r in runs}),
               # --converge runs: None where the pilot stopped at the cap unconverged
               "converged": runs[0]["converged"]["step"] if "converged" in runs[0] else "n/a"}
        for part in ("train", "eval"):  # core-seconds (CPU time of the one thread) where recorded
            key = f"{part}_cpu_s" if row["cpu"] else f"{part}_s"
            row[f"{part}_s"] = mean_se([r[key] for r in runs])
        for key, _, _ in COLUMNS[data]:
            row[key] = mean_se([scalar(r, key) for r in runs])
        rows[data].append(row)
    return dict(rows)


def paired(results: list[dict]) -> dict[str, list[dict]]:
    """Per data set: mean ± s.e. over the common seeds of (loss − BASELINE) for every loss and
    column, then of the OTHER_PAIRS the verdicts compare (where both losses have seeds)."""
    by = {(r["data"], r["variant"], r["seed"]): r for r in results}
    out: dict[str, list[dict]] = defaultdict(list)
    found = list(dict.fromkeys((r["data"], r["variant"]) for r in results))
    pairs = [(d, v, BASELINE) for d, v in found if v != BASELINE]
    pairs += [(d, a, b) for d in dict.fromkeys(d for d, _ in found) for a, b in OTHER_PAIRS]
    for data, variant, base in pairs:
        seeds = sorted(s for (d, v, s) in by if d == data and v == variant and (d, base, s) in by)
        if not seeds:
            continue
        row = {"variant": variant, "base": base, "seeds": seeds,
               "label": by[(data, variant, seeds[0])]["label"],
               "base_label": by[(data, base, seeds[0])]["label"]}
        for key, _, _ in COLUMNS[data]:
            row[key] = mean_se([scalar(by[(data, variant, s)], key)
                                - scalar(by[(data, base, s)], key) for s in seeds])
        out[data].append(row)
    return dict(out)


def fmt(stat: dict, scale: float = 1.0) -> str:
    m, se = stat["mean"] * scale, stat["se"] * scale
    digits = max(2, 1 - math.floor(math.log10(se))) if se > 0 and math.isfinite(se) else 3
    digits = min(digits, 5)
    return f"{m:.{digits}f} ± {se:.{digits}f}" if math.isfinite(se) else f"{m:.{digits}f}"


def markdown(rows: list[dict], data: str, extra: tuple[str, ...] = ("tables", "time")) -> str:
    cols = COLUMNS[data]
    cpu = all(row.get("cpu") for row in rows)
    head = ["loss", "steps (seeds)", *(h for _, h, _ in cols)] + \
        ([f"train + eval {'core-s' if cpu else 's'}"] if "time" in extra else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        steps = "/".join(f"{s:,}" for s in row.get("steps", []))
        mark = " (cap, not converged)" if row.get("converged", "n/a") is None else ""
        seeds = ",".join(map(str, row["seeds"]))
        cells = [row["label"], f"{steps}{mark} ({seeds})", *(fmt(row[k], s) for k, _, s in cols)]
        if "time" in extra:
            cells.append(f"{row['train_s']['mean']:.0f} + {row['eval_s']['mean']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_markdown(rows: list[dict], data: str) -> str:
    cols = COLUMNS[data]
    head = ["difference (seeds)", *(f"Δ {h}" for _, h, _ in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        name = f"{row['label']} − {row['base_label']} ({','.join(map(str, row['seeds']))})"
        lines.append("| " + " | ".join([name, *(fmt(row[k], s) for k, _, s in cols)]) + " |")
    return "\n".join(lines)
