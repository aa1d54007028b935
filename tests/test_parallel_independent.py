"""--parallel-independent: the merge on a hand-built toy, the chunk tracker and sampler, resume without repeating
finished chunks (in process and on Ray Train with 2 workers), and a bad tracker refused with one line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aios_ray.cli import main
from aios_ray.config import Config, ConfigError
from aios_ray.errors import BundleError
from aios_ray.train.bundle import MODEL_FILE, Bundle, load_tensors
from aios_ray.train.independent import (
    TRACKER_FILE,
    ChunkPosition,
    ChunkSampler,
    ChunkTracker,
    checkpoint_worker_states,
    deal,
    merge_weights,
    token_weights,
    worker_dir,
)
from aios_ray.train.run import run_training
from tests.helpers import debug_config, events, train_losses


def _independent(cfg: Config, chunk_size: int, workers: int = 1, use_ray: bool = False, **train) -> Config:
    cluster = dataclasses.replace(cfg.cluster, parallel_independent=True, dataset_chunk_size=chunk_size,
                                  num_workers=workers, use_ray=use_ray)
    return dataclasses.replace(cfg, cluster=cluster, train=dataclasses.replace(cfg.train, **train))


def _resume(cfg: Config, bundle_root: str) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, model=bundle_root))


def _done(checkpoint: Path) -> dict[int, set[tuple[int, int]]]:
    """(pass, chunk) pairs each worker of a checkpoint finished since its run started."""
    return {s["rank"]: {tuple(pair) for pair in s["position"]["done"]} for s in checkpoint_worker_states(checkpoint)}


def _tracker(bundle_root: str) -> dict:
    return json.loads((Path(bundle_root) / TRACKER_FILE).read_text())


# ---- (a) the merge, checked by hand ------------------------------------------------------------------------
def test_merge_weighs_each_expert_by_the_tokens_each_worker_routed_to_it():
    """2 workers, one MoE layer of 2 experts. Expert 0: worker 0 routed 3 tokens, worker 1 routed 1 -> weights
    3/4 and 1/4. Expert 1: nobody routed a token -> plain mean. Everything else: plain mean."""
    a = {"layer.ffn.w_gate_up": torch.tensor([[[1.0, 2.0]], [[10.0, 20.0]]]),  # (experts, hidden, 2 * ffn)
         "layer.ffn.w_down": torch.tensor([[[4.0], [8.0]], [[0.0], [2.0]]]),  # (experts, ffn, hidden)
         "layer.ffn.router.weight": torch.tensor([[1.0], [3.0]]),
         "embed.weight": torch.tensor([[0.0, 1.0]])}
    b = {"layer.ffn.w_gate_up": torch.tensor([[[5.0, 6.0]], [[30.0, 40.0]]]),
         "layer.ffn.w_down": torch.tensor([[[0.0], [4.0]], [[2.0], [4.0]]]),
         "layer.ffn.router.weight": torch.tensor([[3.0], [5.0]]),
         "embed.weight": torch.tensor([[2.0, 3.0]])}
    routed = [{"layer.ffn": torch.tensor([3, 0])}, {"layer.ffn": torch.tensor([1, 0])}]
    merged = merge_weights([a, b], routed)
    # expert 0: 0.75 * a + 0.25 * b; expert 1: (a + b) / 2
    torch.testing.assert_close(merged["layer.ffn.w_gate_up"], torch.tensor([[[2.0, 3.0]], [[20.0, 30.0]]]))
    torch.testing.assert_close(merged["layer.ffn.w_down"], torch.tensor([[[3.0], [7.0]], [[1.0], [3.0]]]))
    torch.testing.assert_close(merged["layer.ffn.router.weight"], torch.tensor([[2.0], [4.0]]))  # not an expert
    torch.testing.assert_close(merged["embed.weight"], torch.tensor([[1.0, 2.0]]))
    assert all(merged[k].dtype == a[k].dtype for k in a)
    assert token_weights(routed, 2) == {"layer.ffn": [[0.75, 0.5], [0.25, 0.5]]}
    # a worker that routed nothing to a layer at all (no counts) weighs nothing where the other routed tokens
    only_b = merge_weights([a, b], [{}, {"layer.ffn": torch.tensor([2, 0])}])
    torch.testing.assert_close(only_b["layer.ffn.w_gate_up"][0], b["layer.ffn.w_gate_up"][0])
    torch.testing.assert_close(only_b["layer.ffn.w_gate_up"][1], torch.tensor([[20.0, 30.0]]))


# ---- (b) chunks and the tracker ----------------------------------------------------------------------------
def test_tracker_records_finished_chunks_per_pass_and_moves_on_when_a_pass_is_complete(tmp_path: Path):
    identity = {"dataset_sha256": "x", "max_seq_len": 8, "chunk_size": 2, "sequences": 7, "num_chunks": 4}
    tracker = ChunkTracker.load(tmp_path / TRACKER_FILE, identity)
    assert tracker.epoch == 0 and tracker.pending(0) == [0, 1, 2, 3]
    assert tracker.add([(0, 1), (0, 3), (1, 0)]) == 3  # a worker that ran ahead finished chunk 0 of pass 1
    assert tracker.add([(0, 1)]) == 0
    tracker.save()
    again = ChunkTracker.load(tmp_path / TRACKER_FILE, identity)
    assert again.pending(0) == [0, 2] and deal(again.pending(0), 0, 2) == [0] and deal(again.pending(0), 1, 2) == [2]
    again.add([(0, 0), (0, 2)])
    assert again.epoch == 1 and again.pending(1) == [1, 2, 3] and 0 not in again.finished


def test_sampler_draws_only_its_chunks_continues_a_chunk_across_batches_and_starts_the_next_pass():
    seq, blocks = 4, 10
    tokens = np.arange(seq * blocks + 1, dtype=np.int32)  # block b starts with token b * seq
    sampler = ChunkSampler(tokens, seq, batch_size=2, seed=0, chunk_size=3, rank=1, world_size=2,
                           position=ChunkPosition(0, deal(range(4), 1, 2)))  # chunks 1 (blocks 3-5), 3 (block 9)
    drawn = [sorted(int(i) for i in sampler.next_batch()[0][:, 0] // seq) for _ in range(3)]
    assert sorted(sum(drawn[:2], [])) == [3, 4, 5, 9]  # chunk 1, then the one block of chunk 3
    assert sampler.position.done == [[0, 1], [0, 3]]
    # every chunk dealt to it drawn: pass 1, its chunks 1 and 3 again (2 of chunk 1's 3 sequences drawn so far)
    assert (sampler.position.pass_index, sampler.position.index, sampler.position.offset) == (1, 0, 2)
    assert sampler.state.epoch == 1 and set(drawn[2]) <= {3, 4, 5}


def test_resumed_run_skips_finished_chunks_continues_a_half_drawn_one_and_trains_as_if_uninterrupted(
        tmp_path: Path):
    """Chunks of 3 sequences, batches of 4: step 1 finishes chunk 0 and draws 1 sequence of chunk 1. A run stopped
    there and resumed gives the losses of the run never stopped, and no chunk is drawn twice."""
    whole_plan, _ = run_training(_independent(debug_config(tmp_path / "whole"), 3))
    stop = tmp_path / "STOP"
    stop.touch()  # present from the start: the run stops after its first step
    cfg = _independent(debug_config(tmp_path / "split", stop_file=str(stop)), 3)
    first, summary = run_training(cfg)
    assert summary["stopped"] and summary["step"] == 1
    assert _tracker(first.bundle_root)["finished"] == {"0": [0]}
    state = checkpoint_worker_states(Bundle(Path(first.bundle_root)).latest_checkpoint())[0]
    assert (state["position"]["index"], state["position"]["offset"]) == (1, 1)  # chunk 1, one sequence drawn
    run_training(_resume(cfg, first.bundle_root))
    split = train_losses(first.log_file)
    whole = train_losses(whole_plan.log_file)
    assert sorted(split) == list(range(1, 7))
    assert [split[s] for s in range(1, 7)] == pytest.approx([whole[s] for s in range(1, 7)], rel=1e-6, abs=1e-7)
    # 6 steps x 4 = 24 sequences = chunks 0-7; the resumed run finished 1-7, never chunk 0 again
    assert _done(Bundle(Path(first.bundle_root)).latest_checkpoint())[0] == {(0, c) for c in range(1, 8)}
    assert _tracker(first.bundle_root)["finished"] == {"0": list(range(8))}
    chunks = events(first.log_file, "chunks")
    assert [(e["finished_in_epoch"], e["next_chunks"][0], e["offset"], e["kept_position"]) for e in chunks] == \
        [(0, 0, 0, False), (1, 1, 1, True)]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("content, message", [
    ('{"version": 1, "epoch": ', "corrupt JSON"),
    ('{"version": 1, "epoch": 0}', "not a chunk tracker"),
    (None, "written for other data or chunking (chunk_size, num_chunks differ)"),
])
def test_a_bad_tracker_is_one_line_and_exit_2_with_nothing_overwritten(tmp_path: Path, capsys, content, message):
    argv = ["train", "--config", "debug", "--no-ray", "--parallel-independent", "--dataset-chunk-size", "4",
            "--steps", "2", "--bundle-dir", str(tmp_path), "--brain-name", "b"]
    assert main(argv) == 0
    bundle = tmp_path / "b"
    tracker = bundle / TRACKER_FILE
    if content is not None:
        tracker.write_text(content)
    capsys.readouterr()
    before = _tree_digest(bundle)
    chunk_size = "4" if content is not None else "5"  # the last case: the tracker was cut in chunks of 4
    code = main(["train", "--config", "debug", "--no-ray", "--parallel-independent", "--dataset-chunk-size",
                 chunk_size, "--model", str(bundle)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(tracker) in err and message in err and "delete it" in err
    assert _tree_digest(bundle) == before


def test_tiered_experts_are_refused_with_parallel_independent(tmp_path: Path):
    cfg = debug_config(tmp_path)
    with pytest.raises(ConfigError, match="each independent worker would need its own store; use --ddp"):
        Config.from_dict({"store": {"experts": "tiered"}, "cluster": {"parallel_independent": True}})
    assert not cfg.cluster.parallel_independent  # the default stays DDP
    with pytest.raises(BundleError, match="not a chunk tracker"):
        (tmp_path / TRACKER_FILE).write_text("[]")
        ChunkTracker.load(tmp_path / TRACKER_FILE, {})


# ---- (c) on Ray Train: 2 workers, interrupted and resumed, then merged ---------------------------------------
def _hand_merge(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The merge written out element by element: mean, or per expert the token-weighted mean."""
    states = {s["rank"]: s for s in checkpoint_worker_states(checkpoint)}
    weights = [load_tensors(worker_dir(checkpoint, r) / MODEL_FILE) for r in sorted(states)]
    expected = {}
    for key in weights[0]:
        copies = [w[key].double() for w in weights]
        if key.endswith((".w_gate_up", ".w_down")):
            layer = key.rsplit(".", 1)[0]
            tokens = [states[r]["routed_tokens"][layer] for r in sorted(states)]
            experts = []
            for e in range(copies[0].shape[0]):
                total = sum(t[e] for t in tokens)
                experts.append(sum(c[e] * t[e] / total for c, t in zip(copies, tokens, strict=True)) if total
                               else sum(c[e] for c in copies) / len(copies))
            expected[key] = torch.stack(experts).float()
        else:
            expected[key] = (sum(copies) / len(copies)).to(weights[0][key].dtype)
    return expected


@pytest.mark.ray
def test_two_ray_workers_resume_without_repeating_chunks_and_the_bundle_holds_their_merge(
        ray_local, tmp_path: Path, capsys):
    train = {"steps": 3, "checkpoint_interval": 3, "eval_interval": 100, "expert_usage_interval": 100}
    cfg = _independent(debug_config(tmp_path), 3, workers=2, use_ray=True, **train)
    first, _ = run_training(cfg)
    finished_first = {(0, c) for c in _tracker(first.bundle_root)["finished"]["0"]}
    # 3 steps x 4 sequences per worker = 4 chunks of 3 each: rank 0 has chunks 0, 2, 4, 6 and rank 1 1, 3, 5, 7
    assert finished_first == {(0, c) for c in range(8)}
    run_training(_resume(cfg, first.bundle_root))  # a new round of 3 steps from the checkpoint of step 6
    out = capsys.readouterr().out
    checkpoint = Bundle(Path(first.bundle_root)).latest_checkpoint()
    done = _done(checkpoint)
    assert done == {0: {(0, c) for c in (8, 10, 12, 14)}, 1: {(0, c) for c in (9, 11, 13, 15)}}
    assert not (done[0] | done[1]) & finished_first  # the resumed run trained none of the finished chunks
    assert _tracker(first.bundle_root)["finished"] == {"0": list(range(16))}
    merged = load_tensors(Path(first.bundle_root) / MODEL_FILE)
    expected = _hand_merge(checkpoint)
    assert set(merged) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(merged[key], tensor, atol=1e-6, rtol=1e-5, msg=key)
    assert not torch.equal(*(load_tensors(worker_dir(checkpoint, r) / MODEL_FILE)["embed.weight"] for r in (0, 1)))
    merges = events(first.log_file, "merge")
    assert [m["step"] for m in merges] == [3, 6]
    assert [w["rank"] for w in merges[-1]["workers"]] == [0, 1]
    assert all(w["eval_loss"] > 0 for w in merges[-1]["workers"]) and merges[-1]["merged_eval_loss"] > 0
    lines = [line for line in out.splitlines() if line.startswith("merge: 2 worker(s)")]
    assert len(lines) == 2  # one per run, on the driver
    line = lines[-1]
    assert f"merged {merges[-1]['merged_eval_loss']:.4f}" in line and "rank 1" in line
