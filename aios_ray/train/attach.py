"""``aios-ray experts attach --model BUNDLE --expert-id ID [--out DIR]``: a registry expert joins a brain.

Writes a *new* brain bundle (default: ``<BUNDLE>-<ID>`` next to it) whose config has ``num_experts + 1`` and whose
weights are the brain's, bit for bit, with the expert appended as the last expert of every MoE layer; its
``metadata.json`` names the expert's index (``attached_experts``), which goal-aware routing reads. The given bundle
is never written: a brain that trained on with E experts keeps its checkpoints valid, and a failed attach leaves
nothing behind (the new bundle is built in a temporary folder and renamed into place). The new brain is for
inference (``generate``, ``eval``, ``export-hf``) and for more ``experts attach``; it has no training checkpoint.

Refused with one line and exit 2, nothing written: an unknown or invalid expert id, an expert without weights, an
expert whose layer count or shapes do not fit the brain, a brain that already holds the expert, an existing --out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from aios_ray.config import ConfigError
from aios_ray.durable import atomic_write_json
from aios_ray.errors import BundleError
from aios_ray.experts.registry import validate_expert_id
from aios_ray.model.expert_surgery import append_expert, expert_misfit, moe_prefixes
from aios_ray.model.hrm import HRMACTv1
from aios_ray.train.bundle import (
    MODEL_FILE,
    Bundle,
    is_bundle,
    load_model_weights,
    model_config_json,
    now,
    read_model_config,
    save_tensors,
)
from aios_ray.train.expert_only import read_expert
from aios_ray.train.goal_routing import ATTACHED_EXPERTS, registry_at


@dataclasses.dataclass
class Attached:
    bundle: Path
    index: int
    note: str | None  # said when the expert was trained on another version of the brain's weights


def attach_expert(model: str, expert_id: str, registry: str | None = None, out: str | None = None) -> Attached:
    validate_expert_id(expert_id)
    entry_path = registry_at(registry).checkpoint_file(expert_id)  # unknown id: RegistryError
    expert, expert_meta = read_expert(entry_path)
    root = Path(model)
    if not root.is_dir() or not is_bundle(root):
        raise BundleError(f"--model {model}: not a brain bundle (config.json and metadata.json expected)")
    cfg = read_model_config(root)
    if not cfg.use_moe:
        raise ConfigError(f"--model {model}: the brain has no MoE layers to attach an expert to")
    metadata = Bundle(root).metadata()
    attached = dict(metadata.get(ATTACHED_EXPERTS, {}))
    if expert_id in attached:
        raise ConfigError(f"--model {model}: the brain already holds expert {expert_id!r} "
                          f"(index {attached[expert_id]})")
    brain = HRMACTv1(cfg)
    load_model_weights(brain, root / MODEL_FILE)
    state = brain.state_dict()
    prefixes = moe_prefixes(brain)
    misfit = expert_misfit(expert, state, prefixes)
    if misfit:
        raise BundleError(f"expert {expert_id!r} does not fit the brain {model}: {misfit}")
    target = Path(out) if out else root.parent / f"{root.name}-{expert_id}"
    if target.exists():
        raise ConfigError(f"--out {target}: already exists (choose another --out)")
    attached[expert_id] = cfg.num_experts
    _write_bundle(root, target, dataclasses.replace(cfg, num_experts=cfg.num_experts + 1),
                  append_expert(state, prefixes, expert),
                  {"name": target.name, "base_model": str(root.resolve()), ATTACHED_EXPERTS: attached,
                   "total_steps": metadata.get("total_steps", 0), "created_at": now(), "updated_at": now()})
    digest = hashlib.sha256((root / MODEL_FILE).read_bytes()).hexdigest()
    note = None if expert_meta.get("base_sha256") in (None, digest) else (
        f"note: {expert_id} was trained on other weights ({expert_meta.get('base_model')}); its shapes fit")
    return Attached(target, cfg.num_experts, note)


def _write_bundle(source: Path, target: Path, cfg, state, metadata: dict) -> None:
    """The new bundle, complete in a temporary sibling folder before it takes its name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        atomic_write_json(tmp / "config.json", model_config_json(cfg))
        shutil.copyfile(source / "tokenizer.json", tmp / "tokenizer.json")
        if (source / "training_args.json").is_file():
            shutil.copyfile(source / "training_args.json", tmp / "training_args.json")
        save_tensors(tmp / MODEL_FILE, state)
        atomic_write_json(tmp / "metadata.json", metadata)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
