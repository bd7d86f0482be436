"""st: score-based diffusion models with Soft Truncation, driven by YAML recipes."""

__version__ = "0.1.0"
