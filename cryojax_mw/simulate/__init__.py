"""Simulated data: test phantoms."""

from ._phantoms import random_blobs, shepp_logan

__all__ = ["random_blobs", "shepp_logan"]
