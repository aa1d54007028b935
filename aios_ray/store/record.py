"""What the tiered store holds: one record per expert, addressed by (layer, expert).

A record is the expert's weights *and* its optimizer state, laid out in one flat fp32 array, so that
moving an expert between tiers is one contiguous copy and a cache slot is one contiguous slice:

    w_gate_up (C, 2F) | w_down (F, C) | exp_avg of both | exp_avg_sq of both | step (1)

``ExpertLayout.views(flat)`` gives named tensor views into such an array (no copy). On disk a record
is a safetensors file with these names; in Ray's object store it is the flat numpy array.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

WEIGHTS = ("w_gate_up", "w_down")
PARTS = (*WEIGHTS, *(f"exp_avg.{w}" for w in WEIGHTS), *(f"exp_avg_sq.{w}" for w in WEIGHTS), "step")


@dataclass(frozen=True, order=True)
class ExpertKey:
    layer: int
    expert: int

    @property
    def name(self) -> str:
        """A file-safe name: ``L003-E00017``."""
        return f"L{self.layer:03d}-E{self.expert:05d}"

    @classmethod
    def parse(cls, name: str) -> ExpertKey:
        layer, expert = name.split("-")
        if not (layer.startswith("L") and expert.startswith("E")):
            raise ValueError(f"not an expert name: {name!r}")
        return cls(int(layer[1:]), int(expert[1:]))


@dataclass(frozen=True)
class ExpertLayout:
    hidden_size: int
    ffn_size: int

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        C, F = self.hidden_size, self.ffn_size
        weight = {"w_gate_up": (C, 2 * F), "w_down": (F, C)}
        shapes = dict(weight)
        for moment in ("exp_avg", "exp_avg_sq"):
            shapes.update({f"{moment}.{name}": shape for name, shape in weight.items()})
        shapes["step"] = (1,)
        return shapes

    @cached_property
    def offsets(self) -> dict[str, tuple[int, int]]:
        out, start = {}, 0
        for name in PARTS:
            size = int(np.prod(self.shapes[name]))
            out[name] = (start, start + size)
            start += size
        return out

    @property
    def numel(self) -> int:
        """Rounded up to 16 floats (64 bytes): every slot of a slab then starts 64-byte aligned, as grouped
        matmul kernels and CUDA want; the padding after ``step`` is never stored on disk."""
        return -(-self.offsets["step"][1] // 16) * 16

    @property
    def nbytes(self) -> int:
        return self.numel * 4

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into one record (a 1-D fp32 tensor of ``numel`` elements); no copy."""
        assert flat.numel() == self.numel, (flat.numel(), self.numel)
        return {name: flat[a:b].view(self.shapes[name]) for name, (a, b) in self.offsets.items()}

    def pack(self, parts: dict[str, torch.Tensor]) -> np.ndarray:
        flat = np.zeros(self.numel, dtype=np.float32)
        views = self.views(torch.from_numpy(flat))
        for name, tensor in parts.items():
            views[name].copy_(tensor)
        return flat
