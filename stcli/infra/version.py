"""The package version (pyproject.toml's `version`), written into manifests and `st --version`."""

__version__ = "0.1.0"
