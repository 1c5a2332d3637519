"""Draft heads that run on a target's features (EAGLE)."""
from .eagle import EagleConfig, EagleHead

__all__ = ["EagleConfig", "EagleHead"]
