"""Prepared datasets: `data prepare` (in process and on Ray Data), the streamed sampler and its resume position,
training from `--data` / `--use-chunked-training`, and bad prepared directories refused with one line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aios_ray.cli import main
from aios_ray.data import shards, stream
from aios_ray.data.dataset import SamplerState
from aios_ray.data.prepare_shards import PrepareSpec, prepare_dataset
from aios_ray.data.shards import ShardSampler, open_prepared, read_blocks
from aios_ray.data.text import SAMPLE_TRAIN
from aios_ray.errors import user_error_behind
from aios_ray.train.run import run_training
from aios_ray.train.stream_data import first_micro_batch
from tests.helpers import debug_config, train_losses

SEQ, CHUNK = 32, 16  # the debug preset's --max-seq-len; blocks per shard


def _corpus(folder: Path) -> Path:
    """A few KB of the sample corpus as .txt, .jsonl and .parquet (every source kind `data prepare` reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    paragraphs = SAMPLE_TRAIN.read_text(encoding="utf-8").split("\n\n")[:240]
    (folder / "a.txt").write_text("\n\n".join(paragraphs[:120]), encoding="utf-8")
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[120:180]),
                                    encoding="utf-8")
    pq.write_table(pa.table({"text": paragraphs[180:]}), folder / "c.parquet", row_group_size=20)
    return folder


def _prepare(corpus: Path, out: Path, **overrides) -> dict:
    spec = PrepareSpec(dataset=str(corpus), out=str(out), max_seq_len=SEQ, chunk_blocks=CHUNK, vocab_size=300,
                       eval_fraction=0.05, piece_mb=0.004, use_ray=False)
    return prepare_dataset(dataclasses.replace(spec, **overrides))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    _prepare(_corpus(root / "corpus"), root / "data")
    return root / "data"


def _tree(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_prepare_writes_shards_and_a_manifest_and_a_rerun_is_a_no_op(prepared: Path):
    manifest = open_prepared(str(prepared)).raw
    assert manifest["block_len"] == SEQ + 1 and len(manifest["sources"]) == 3
    assert manifest["split"]["train_blocks"] > 10 * CHUNK and manifest["split"]["eval_blocks"] > 0
    assert manifest["tokenizer"]["sample"].startswith("at most 64 MiB")
    assert all(s["blocks"] <= CHUNK for s in manifest["shards"])
    assert manifest["pieces"] > 3  # the .txt cut in several pieces at blank lines, the .parquet by row group
    blocks = read_blocks(prepared / manifest["shards"][0]["file"], SEQ + 1)
    assert blocks.shape == (manifest["shards"][0]["blocks"], SEQ + 1) and blocks.dtype == np.int32
    before = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}
    again = _prepare(prepared.parent / "corpus", prepared)
    assert again["skipped"] and {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()} == before


def test_prepare_refuses_to_overwrite_another_preparation(prepared: Path, capsys):
    before = _tree(prepared)
    code = main(["data", "prepare", "--dataset-file", str(prepared.parent / "corpus" / "a.txt"), "--out",
                 str(prepared), "--no-ray", "--max-seq-len", str(SEQ), "--tokenizer-vocab-size", "300"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "other inputs" in err
    assert _tree(prepared) == before


def test_the_streamed_order_resumes_exactly_and_the_ranks_share_no_block(prepared: Path):
    manifest = open_prepared(str(prepared))
    whole = ShardSampler(manifest, batch_size=4, seed=3)
    per_epoch = whole.batches_per_epoch
    seen = [whole.next_batch()[0] for _ in range(per_epoch + 5)]  # across an epoch boundary
    for stop in (1, 7, per_epoch - 1, per_epoch + 2):  # mid-shard, shard boundaries, the next epoch
        resumed = ShardSampler(manifest, batch_size=4, seed=3, state=SamplerState(*_position(stop, per_epoch)))
        for index in range(stop, len(seen)):
            assert (resumed.next_batch()[0] == seen[index]).all(), (stop, index)
    stored = Counter(tuple(row) for s in manifest.shards("train")
                     for row in read_blocks(prepared / s["file"], SEQ + 1)[:, :-1].tolist())
    first_epoch = Counter(tuple(row.tolist()) for batch in seen[:per_epoch] for row in batch)
    assert first_epoch.total() == per_epoch * 4 and not first_epoch - stored  # no block twice in an epoch
    ranks = [ShardSampler(manifest, batch_size=4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch
    rows = [{tuple(x.tolist()) for _ in range(5) for x in sampler.next_batch()[0]} for sampler in ranks]
    assert not rows[0] & rows[1]


def test_a_stream_planned_again_and_again_gives_the_batches_of_one_planned_once(prepared: Path, monkeypatch):
    manifest = open_prepared(str(prepared))
    once = ShardSampler(manifest, batch_size=4, seed=3, rank=1, world_size=2)
    per_rank = once.batches_per_epoch // 2  # batches_per_epoch counts every rank's
    expected = [once.next_batch()[0] for _ in range(3 * per_rank + 2)]
    planned = []

    def one_epoch_at_a_time(*args, **kwargs):  # the stream ends after every epoch and is planned on from there
        planned.append(args[-2:])
        return stream.stream_items(*args, least=1)

    monkeypatch.setattr(shards, "stream_items", one_epoch_at_a_time)
    again = ShardSampler(manifest, batch_size=4, seed=3, rank=1, world_size=2)
    for index, batch in enumerate(expected):
        assert (again.next_batch()[0] == batch).all(), index
    assert [epoch for epoch, _ in planned] == [0, 1, 2, 3] and all(batch == 0 for _, batch in planned)


@pytest.mark.ray
@pytest.mark.parametrize("blocks_per_segment", [None, 13])
def test_ray_data_streams_the_batches_of_the_in_process_reader_and_resumes_at_the_same_block(
        prepared: Path, ray_local, monkeypatch, blocks_per_segment: int | None):
    """A Ray worker's reader (a Ray Data stream read with iter_torch_batches) against the in-process one: rank 1 of
    2 across an epoch boundary, then both restored mid-shard in the next epoch. With 13 blocks a segment (read
    tasks of 5) the stream is many Ray Data executions, and a batch of 4 is often cut by a segment's end."""
    if blocks_per_segment:
        block_bytes = (SEQ + 1) * 4
        monkeypatch.setattr(stream, "TASK_BYTES", 5 * block_bytes)
        monkeypatch.setattr(stream, "SEGMENT_BYTES", blocks_per_segment * block_bytes)
    manifest = open_prepared(str(prepared))
    local = ShardSampler(manifest, batch_size=4, seed=3, rank=1, world_size=2, reader="local")
    on_ray = ShardSampler(manifest, batch_size=4, seed=3, rank=1, world_size=2, reader="ray")
    for index in range(local.batches_per_epoch // 2 + 3):  # one rank's epoch and 3 batches
        ids, labels = on_ray.next_batch()
        expected_ids, expected_labels = local.next_batch()
        assert (ids == expected_ids).all() and (labels == expected_labels).all(), index
    assert on_ray.state == local.state and on_ray.state.epoch == 1
    for sampler in (local, on_ray):
        sampler.restore(SamplerState(1, 3))  # rank 1 resumes at its second batch of epoch 1
    for index in range(6):
        assert (on_ray.next_batch()[0] == local.next_batch()[0]).all(), index
    on_ray.close()


@pytest.mark.ray
def test_a_shard_damaged_while_a_ray_worker_streams_it_is_named_in_one_line(prepared: Path, tmp_path: Path,
                                                                            ray_local):
    """Checked at the start, a shard can still be cut short later (a disk filling up, a copy still running): the
    Ray Data read that meets it fails, and the error a user sees names the file."""
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    sampler = ShardSampler(open_prepared(str(data)), batch_size=4, seed=3, reader="ray")
    for shard in data.glob("train-*.parquet"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(Exception) as raised:
        for _ in range(sampler.batches_per_epoch):
            sampler.next_batch()
    error = user_error_behind(raised.value)
    assert error is not None and "not a readable Parquet file" in str(error) and str(data) in str(error)
    assert len(str(error).splitlines()) == 1
    sampler.close()


def _position(batches: int, per_epoch: int) -> tuple[int, int]:
    return batches // per_epoch, batches % per_epoch


def _recording(monkeypatch) -> list[str]:
    """The blocks of every batch the training loop draws, as hashes, in order."""
    drawn: list[str] = []
    original = ShardSampler.next_batch

    def next_batch(self, batch_size=None):
        ids, labels = original(self, batch_size)
        drawn.append(hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16])
        return ids, labels

    monkeypatch.setattr(ShardSampler, "next_batch", next_batch)
    return drawn


def test_an_interrupted_and_resumed_streamed_run_sees_the_blocks_of_an_uninterrupted_one(
        prepared: Path, tmp_path: Path, monkeypatch):
    drawn = _recording(monkeypatch)
    whole_plan, _ = run_training(debug_config(tmp_path / "whole", data=str(prepared), steps=4))
    whole, whole_losses = list(drawn), train_losses(whole_plan.log_file)
    drawn.clear()
    stop_file = tmp_path / "STOP"
    stop_file.touch()  # the run stops after its first step
    cfg = debug_config(tmp_path / "split", data=str(prepared), steps=4, stop_file=str(stop_file))
    first_plan, first = run_training(cfg)
    assert first["stopped"] and first["step"] == 1
    run_training(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, model=first_plan.bundle_root)))
    assert drawn == whole and len(whole) == 4
    split = train_losses(first_plan.log_file)
    for step in range(1, 5):
        assert split[step] == pytest.approx(whole_losses[step], rel=1e-6, abs=1e-7), step


def test_chunked_training_on_a_dataset_file_prepares_once_and_cuts_micro_batches(tmp_path: Path, monkeypatch):
    corpus = _corpus(tmp_path / "corpus") / "a.txt"
    overrides = {"dataset_file": str(corpus), "use_chunked_training": True, "chunk_size": 2 * SEQ, "steps": 2,
                 "eval_batches": 1}
    cfg = debug_config(tmp_path, **overrides)
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, dataset_chunk_size=CHUNK))
    assert first_micro_batch(cfg) == 2  # --chunk-size 64 tokens = 2 sequences of 32 per micro-batch
    plan, summary = run_training(cfg)
    assert summary["step"] == 2
    cache = Path(cfg.train.bundle_dir).resolve().parent / "datasets"
    (prepared_dir,) = cache.iterdir()
    assert plan.config.model.vocab_size == open_prepared(str(prepared_dir)).raw["vocab_size"]
    again = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, brain_name="again"))
    run_training(again)
    assert [p.name for p in cache.iterdir()] == [prepared_dir.name]  # the same inputs: the same preparation


@pytest.mark.parametrize("damage, message", [
    ("foreign", "tokenized with another tokenizer"),
    ("missing", "listed in the manifest but missing"),
    ("count", "blocks, the manifest says"),
    ("extra", "the manifest does not list"),
    ("truncated", "not a readable Parquet file"),
])
def test_a_damaged_preparation_is_refused_with_one_line_and_nothing_written(
        prepared: Path, tmp_path: Path, capsys, damage: str, message: str):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    manifest = json.loads((data / "manifest.json").read_text())
    shard = data / manifest["shards"][0]["file"]
    if damage == "foreign":  # the same-named shard of a preparation with another tokenizer
        other = _prepare(prepared.parent / "corpus", tmp_path / "other", vocab_size=280)
        shutil.copy(Path(other["out"]) / shard.name, shard)
    elif damage == "missing":
        shard.unlink()
    elif damage == "count":
        manifest["shards"][0]["blocks"] += 1
        manifest["blocks"] += 1
        (data / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "extra":
        shutil.copy(shard, data / "train-999999-0000.parquet")
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = _tree(data)
    bundles = tmp_path / "brains"
    code = main(["train", "--config", "debug", "--no-ray", "--data", str(data), "--bundle-dir", str(bundles)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not bundles.exists() and _tree(data) == before
    # `data prepare` into it again: said, not overwritten
    code = main(["data", "prepare", "--dataset-file", str(prepared.parent / "corpus"), "--out", str(data),
                 "--no-ray", "--max-seq-len", str(SEQ)])
    assert code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1 and _tree(data) == before


def test_data_of_another_sequence_length_or_tokenizer_than_the_run_is_refused(prepared: Path, tmp_path: Path,
                                                                               capsys):
    code = main(["train", "--config", "debug", "--no-ray", "--data", str(prepared), "--max-seq-len", "64",
                 "--bundle-dir", str(tmp_path)])
    assert code == 2 and "prepared for --max-seq-len 32" in capsys.readouterr().err
    other = _prepare(prepared.parent / "corpus", tmp_path / "other", vocab_size=280)
    code = main(["train", "--config", "debug", "--no-ray", "--data", str(prepared), "--tokenizer",
                 str(Path(other["out"]) / "tokenizer.json"), "--bundle-dir", str(tmp_path)])
    assert code == 2 and "another tokenizer" in capsys.readouterr().err


@pytest.mark.ray
def test_ray_data_prepares_the_same_shards_as_the_in_process_path(prepared: Path, tmp_path: Path, ray_local):
    summary = _prepare(prepared.parent / "corpus", tmp_path / "on_ray", use_ray=True)
    assert not summary["skipped"]
    assert _tree(Path(summary["out"])) == _tree(prepared)  # same key, same blocks, byte for byte


@pytest.mark.ray
def test_data_prepare_on_ray_prints_its_own_progress_and_ray_datas_lines_only_with_verbose(prepared: Path,
                                                                                            tmp_path: Path):
    """In a log (no terminal) Ray Data would log a block of progress lines every few seconds of a long prepare."""
    def console(out: Path, *flags: str) -> str:
        done = subprocess.run([sys.executable, "-m", "aios_ray", "data", "prepare", "--dataset-file",
                               str(prepared.parent / "corpus"), "--out", str(out), "--tokenizer", str(prepared),
                               "--max-seq-len", str(SEQ), "--dataset-chunk-size", str(CHUNK), "--piece-mb", "0.004",
                               *flags], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout + done.stderr

    quiet = console(tmp_path / "quiet")
    assert "prepare: " in quiet and "pieces |" in quiet and "prepared:" in quiet
    assert "Running Dataset" not in quiet and "execution finished" not in quiet
    assert "execution finished" in console(tmp_path / "verbose", "--verbose")


@pytest.mark.ray
def test_the_flow_with_chunked_training_prepares_shards_and_trains_from_them(ray_local, tmp_path: Path):
    corpus = tmp_path / "train.txt"
    corpus.write_text(SAMPLE_TRAIN.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    flows = tmp_path / "flows"
    assert main(["flow", "hrm-train", "--dataset-file", str(corpus), "--brain-name", "t", "--flow-dir", str(flows),
                 "--eval-batches", "2", "--train-args",
                 f"--config debug --steps 2 --use-chunked-training --dataset-chunk-size {CHUNK}"]) == 0
    [prepare] = [d for d in (flows / "t").glob("prepare-*") if (d / "done.json").is_file()]
    manifest = open_prepared(str(prepare / "shards")).raw
    assert manifest["split"]["eval_blocks"] == 0 and manifest["blocks"] > 0  # eval: the step's held-out text
    [train] = [d for d in (flows / "t").glob("train-*") if (d / "done.json").is_file()]
    history = json.loads((train / "t" / "metadata.json").read_text())["dataset_history"]
    assert history[-1]["prepared"] and history[-1]["dataset"] == str((prepare / "shards").resolve())
