"""Between a model's local experts and store records: seeding a store, and full weights for a bundle."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from aios_ray.config import ModelConfig
from aios_ray.model.hrm import HRMACTv1
from aios_ray.store.record import ExpertKey, ExpertLayout
from aios_ray.store.tiers import Item


def expert_layout(model: HRMACTv1) -> ExpertLayout:
    return ExpertLayout(model.cfg.hidden_size, model.cfg.ffn_size)


def count_experts(model_cfg: ModelConfig) -> int:
    """How many experts a model of this config has, asked of the model itself (built on the meta device:
    no memory, no initialisation cost), so that nothing recounts its layers by hand."""
    with torch.device("meta"):
        return len(expert_keys(HRMACTv1(model_cfg)))


def expert_keys(model: HRMACTv1) -> list[ExpertKey]:
    return [ExpertKey(moe.layer_index, e) for moe in model.moe_layers() for e in range(moe.num_experts)]


def local_expert_records(model: HRMACTv1) -> list[Item]:
    """Every expert of a model that still holds its experts locally, as version-0 records (zero moments)."""
    layout = expert_layout(model)
    return [(ExpertKey(moe.layer_index, e),
             layout.pack({"w_gate_up": moe.w_gate_up[e].detach().cpu(), "w_down": moe.w_down[e].detach().cpu()}), 0)
            for moe in model.moe_layers() for e in range(moe.num_experts)]


def expert_parameter_names(model: HRMACTv1) -> dict[int, str]:
    """MoE layer index -> the module path its expert weights have in a local model's state dict."""
    return {module.layer_index: name for name, module in model.named_modules() if module in model.moe_layers()}


def experts_state_dict(model: HRMACTv1, keys: Sequence[ExpertKey],
                       records: Sequence[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
    """Stacked ``<layer>.w_gate_up`` / ``<layer>.w_down`` tensors, as a local model's state dict has them."""
    layout = expert_layout(model)
    names = expert_parameter_names(model)
    per_layer: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for key, (flat, _version) in zip(keys, records, strict=True):
        per_layer.setdefault(key.layer, {})[key.expert] = layout.views(torch.from_numpy(np.array(flat)))
    out = {}
    for layer, experts in per_layer.items():
        order = [experts[e] for e in sorted(experts)]
        for weight in ("w_gate_up", "w_down"):
            out[f"{names[layer]}.{weight}"] = torch.stack([views[weight] for views in order])
    return out


def records_to_tensors(keys: Sequence[ExpertKey], records: Sequence[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
    """Full records as tensors for a safetensors file: ``<layer>.<expert>`` the flat record, ``versions`` the
    (layer, expert, version) rows."""
    tensors = {f"{key.layer}.{key.expert}": torch.from_numpy(np.array(flat, copy=True))
               for key, (flat, _version) in zip(keys, records, strict=True)}
    tensors["versions"] = torch.tensor([[key.layer, key.expert, version]
                                        for key, (_flat, version) in zip(keys, records, strict=True)],
                                       dtype=torch.int64).reshape(-1, 3)
    return tensors


def tensors_to_records(tensors: dict[str, torch.Tensor]) -> list[Item]:
    """The records ``records_to_tensors`` wrote, as store items."""
    return [(ExpertKey(int(layer), int(expert)), tensors[f"{int(layer)}.{int(expert)}"].numpy(), int(version))
            for layer, expert, version in tensors["versions"].tolist()]
