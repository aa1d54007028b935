"""Brain bundles: ``artifacts/brains/actv1/<brain-name>/``.

```
config.json           model architecture (ModelConfig)
model.safetensors     latest weights
tokenizer.json        Hugging Face tokenizers file
metadata.json         cumulative steps, dataset history, eval history, timestamps, latest checkpoint
training_args.json    the resolved Config of the latest run
checkpoints/step_N/   model.safetensors, optimizer.safetensors, trainer_state.json
```
Everything on disk is safetensors or JSON (never pickle; but for DeepSpeed's own ``deepspeed/`` folder in the
checkpoints of a ``--zero-stage`` run). Every file is written to a temporary name,
fsynced and renamed; a checkpoint directory is complete before it gets its final name, and
``metadata.json``, which names the latest checkpoint, is written last.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from aios_ray.config import BUNDLE_MODEL_TYPE, ModelConfig
from aios_ray.durable import atomic_write_bytes, atomic_write_json
from aios_ray.errors import BundleError

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
EXPERT_RECORDS_FILE = "expert_records.safetensors"  # tiered experts' full records: a node without a store rebuilds it


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: corrupt JSON ({exc})") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save_safetensors_bytes(cpu))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_bytes(path.read_bytes())
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{path}: corrupt or truncated safetensors file ({str(exc)[:100]})") from None


def load_model_weights(model: torch.nn.Module, path: Path, skip_experts: bool = False) -> None:
    """Load a bundle's weights; ``skip_experts`` leaves out expert weights (a tiered model holds none)."""
    state = load_tensors(path)
    if skip_experts:
        state = {k: v for k, v in state.items() if ".ffn.w_" not in k}
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise BundleError(f"{path}: does not fit the model (missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]})")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise BundleError(f"{path}: {key} has shape {tuple(tensor.shape)}, model expects "
                              f"{tuple(expected[key].shape)}")
    model.load_state_dict(state)


def model_config_json(config: ModelConfig | dict[str, Any]) -> dict[str, Any]:
    """A bundle's config.json: the ModelConfig fields, and the ``model_type`` under which ``aios_ray.hf.register()``
    registers the model with ``transformers`` (so ``AutoModelForCausalLM.from_pretrained(bundle)`` loads it)."""
    fields = asdict(config) if isinstance(config, ModelConfig) else dict(config)
    return {"model_type": BUNDLE_MODEL_TYPE, **fields}


def read_model_config(root: Path) -> ModelConfig:
    data = read_json(root / "config.json")
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != "model_type"}  # transformers' key; bundles before it lack it
    try:
        return ModelConfig(**data)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{root / 'config.json'}: invalid model config ({exc})") from None


def checkpoint_name(step: int) -> str:
    """``step_00000010``: names sort in step order (checkpoint directories, expert store snapshots)."""
    return f"step_{step:08d}"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def is_bundle(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "metadata.json").is_file()


@dataclass
class Bundle:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def metadata(self) -> dict[str, Any]:
        return read_json(self.root / "metadata.json")

    def latest_checkpoint(self) -> Path:
        """The checkpoint that metadata.json names; raises BundleError naming what is wrong."""
        name = self.metadata().get("latest_checkpoint")
        if not name:
            raise BundleError(f"{self.root / 'metadata.json'}: names no checkpoint to resume from")
        path = self.checkpoints / name
        for required in (MODEL_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE):
            if not (path / required).is_file():
                raise BundleError(f"{path / required}: missing")
        return path

    def write_checkpoint(self, step: int, files: dict[str, bytes], keep: int,
                         moved: dict[str, Path] | None = None) -> Path:
        """Write a complete checkpoint directory under a temporary name, then rename it into place.

        ``moved``: directories written elsewhere (DeepSpeed's, by every worker) moved in under the given names."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints / checkpoint_name(step)
        tmp = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=f".tmp-{checkpoint_name(step)}-"))
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
        for name, source in (moved or {}).items():
            os.rename(source, tmp / name)  # the same filesystem: the staged directory sits next to tmp
        if final.exists():  # same step written again (e.g. stop right after a periodic checkpoint)
            shutil.rmtree(final)
        os.rename(tmp, final)
        self._prune(keep, protect=final)
        return final

    def _prune(self, keep: int, protect: Path) -> None:
        done = sorted(p for p in self.checkpoints.glob("step_*") if p.is_dir())
        for old in done[:-keep]:
            if old != protect:
                shutil.rmtree(old, ignore_errors=True)

    def write_header(self, model_config: dict[str, Any], tokenizer_json: str,
                     training_args: dict[str, Any]) -> None:
        """The run-independent files: architecture, tokenizer and the resolved config of this run."""
        atomic_write_json(self.root / "config.json", model_config_json(model_config))
        atomic_write_bytes(self.root / "tokenizer.json", tokenizer_json.encode("utf-8"))
        atomic_write_json(self.root / "training_args.json", training_args)

    def publish(self, checkpoint: Path, metadata: dict[str, Any]) -> None:
        """Make a written checkpoint the bundle's current state; metadata.json goes last."""
        atomic_write_bytes(self.root / MODEL_FILE, (checkpoint / MODEL_FILE).read_bytes())
        metadata = {**metadata, "latest_checkpoint": checkpoint.name, "updated_at": now()}
        atomic_write_json(self.root / "metadata.json", metadata)
