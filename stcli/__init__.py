"""st: score-based diffusion models with Soft Truncation, driven by YAML recipes.

``from stcli import load, sample`` gives the notebook API (see stcli.jobs.api); it is imported on
first use, so that ``import stcli`` (and the CLI) stays fast.
"""

from stcli.infra.version import __version__ as __version__  # re-exported: stcli.__version__

__all__ = ["load", "sample"]


def __getattr__(name: str):
    if name in __all__:
        from stcli.jobs import api

        return getattr(api, name)
    raise AttributeError(f"module 'stcli' has no attribute {name!r}")
