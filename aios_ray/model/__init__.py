"""Pure-torch model code (never imports ray)."""

from aios_ray.model.hrm import HRMACTv1, HRMOutput
from aios_ray.model.moe import MoEFeedForward

__all__ = ["HRMACTv1", "HRMOutput", "MoEFeedForward"]
