"""Which checkpoint a (re)started worker resumes from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aios_ray.errors import BundleError
from aios_ray.train.bundle import MODEL_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE, Bundle
from aios_ray.train.checkpointing import resume_source


def _checkpoint(folder: Path, step: int, run_id: str) -> Path:
    path = folder / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / TRAINER_STATE_FILE).write_text(json.dumps({"trainer": {"step": step}, "run_id": run_id}))
    (path / MODEL_FILE).write_bytes(b"weights")
    (path / OPTIMIZER_FILE).write_bytes(b"state")
    return path


def test_a_restarted_worker_takes_the_newest_checkpoint_of_its_run(tmp_path: Path):
    bundle = Bundle(tmp_path / "bundle")
    _checkpoint(bundle.checkpoints, 30, "earlier-run")  # an earlier run of the same bundle: never ours
    _checkpoint(bundle.checkpoints, 10, "this-run")
    newest = _checkpoint(bundle.checkpoints, 20, "this-run")
    ray_restored = _checkpoint(tmp_path / "ray_results", 10, "this-run")  # Ray had not taken in step 20 yet
    assert resume_source(ray_restored, bundle, "this-run", None) == newest
    assert resume_source(None, bundle, "this-run", None) == newest  # Ray restored nothing at all
    assert resume_source(None, bundle, "new-run", str(tmp_path / "given")) == tmp_path / "given"  # --model
    assert resume_source(None, Bundle(tmp_path / "empty"), "this-run", None) is None  # a fresh run


def test_workers_agree_on_one_checkpoint(tmp_path: Path):
    """A worker on another node sees only Ray's checkpoint: every worker resumes from the one all have."""
    bundle = Bundle(tmp_path / "bundle")
    _checkpoint(bundle.checkpoints, 20, "run")
    ray_restored = _checkpoint(tmp_path / "ray_results", 10, "run")
    assert resume_source(ray_restored, bundle, "run", None, agree=lambda step: min(step, 10)) == ray_restored
    with pytest.raises(BundleError, match="different checkpoints"):
        resume_source(ray_restored, bundle, "run", None, agree=lambda step: 5)
