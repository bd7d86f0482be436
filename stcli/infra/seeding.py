"""Derived seeds: every random draw of st is keyed by what it is for, never by call order."""

from __future__ import annotations

import hashlib

import torch


def seed_for(*keys) -> int:
    """A 63-bit seed derived from `keys`, stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator(device: torch.device | str, *keys) -> torch.Generator:
    """A generator on `device` seeded by `keys`."""
    return torch.Generator(device=device).manual_seed(seed_for(*keys))
