from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import xxhash

from aios_ray.errors import UserError
from aios_ray.store.nvme import MANIFEST, NvmeStore, StoreCorruptError, StoreLayoutError
from aios_ray.store.record import ExpertKey, ExpertLayout

# 73,729 floats = 288 KiB a record: above Ray's 100 KiB inline limit, so results go to the object store.
LAYOUT = ExpertLayout(hidden_size=64, ffn_size=128)


def record(seed: int, layout: ExpertLayout = LAYOUT) -> np.ndarray:
    """Random bit patterns (NaN payloads, denormals, -0.0 included), so equality is checked bit for bit."""
    bits = np.random.default_rng(seed).integers(0, 2**32, layout.numel, dtype=np.uint32)
    bits[layout.offsets["step"][1]:] = 0  # the alignment padding after the record is not data: it reads as 0
    return bits.view(np.float32)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture
def store(tmp_path: Path):
    with NvmeStore(tmp_path / "nvme", LAYOUT) as s:
        yield s


def test_round_trip_is_bit_for_bit_and_keeps_versions(store: NvmeStore):
    key = ExpertKey(3, 17)
    store.write(key, record(1), version=1)
    store.write(key, record(2), version=2)
    flat, version = store.read(key)
    assert same_bits(flat, record(2)) and version == 2 and store.version(key) == 2
    assert flat.flags.writeable and flat.flags.c_contiguous
    assert store.path(key) == store.root / "experts" / "L003-E00017.000000002.safetensors"
    assert [p.name for p in (store.root / "experts").iterdir()] == ["L003-E00017.000000002.safetensors"]
    with NvmeStore(store.root, LAYOUT) as reopened:
        flat, version = reopened.read(key)
        assert same_bits(flat, record(2)) and version == 2


def test_manifest_records_xxh3_version_bytes_and_layout(store: NvmeStore):
    key = ExpertKey(0, 5)
    store.write(key, record(0), version=7)
    manifest = json.loads((store.root / MANIFEST).read_text())
    data = store.path(key).read_bytes()
    assert manifest["format"] == 2 and manifest["layout"] == {"hidden_size": 64, "ffn_size": 128}
    assert manifest["experts"]["L000-E00005"] == {"file": "experts/L000-E00005.000000001.safetensors", "version": 7,
                                                  "xxh3_128": xxhash.xxh3_128_hexdigest(data), "bytes": len(data)}


def test_file_is_a_plain_safetensors_file_with_the_named_parts(store: NvmeStore):
    from safetensors.numpy import load_file

    key = ExpertKey(1, 2)
    store.write(key, record(4), version=1)
    parts = load_file(store.path(key))
    assert {name: p.shape for name, p in parts.items()} == LAYOUT.shapes
    assert same_bits(parts["w_down"].ravel(), record(4)[slice(*LAYOUT.offsets["w_down"])])


def test_write_many_adds_keys_with_one_manifest_write(store: NvmeStore, monkeypatch):
    keys = [ExpertKey(layer, expert) for layer in range(2) for expert in range(3)]
    manifest_writes = []
    real = store._write_manifest
    monkeypatch.setattr(store, "_write_manifest", lambda entries: (manifest_writes.append(1), real(entries)))
    store.write_many([(key, record(i), i) for i, key in enumerate(keys)])
    assert manifest_writes == [1]
    assert store.keys() == keys and len(store) == 6 and ExpertKey(1, 2) in store and ExpertKey(9, 9) not in store
    results = store.read_many(list(reversed(keys)))
    for i, (key, (flat, version)) in enumerate(zip(reversed(keys), results, strict=True)):
        assert same_bits(flat, record(len(keys) - 1 - i)) and version == store.version(key)
    assert store.verify_all() == []


def test_bad_batches_are_refused_before_anything_is_written(store: NvmeStore):
    key = ExpertKey(0, 0)
    with pytest.raises(ValueError, match="twice"):
        store.write_many([(key, record(0), 1), (key, record(1), 2)])
    with pytest.raises(ValueError, match="float32"):
        store.write_many([(ExpertKey(0, 1), record(0), 1), (key, np.zeros(LAYOUT.numel), 1)])
    with pytest.raises(ValueError, match="version"):
        store.write(key, record(0), version=-1)
    assert store.keys() == [] and list((store.root / "experts").iterdir()) == []
    with pytest.raises(KeyError, match="L000-E00000"):
        store.read(key)


def test_writes_leave_no_temp_files_even_when_they_fail(store: NvmeStore, monkeypatch):
    key = ExpertKey(2, 4)
    store.write_many([(key, record(1), 1), (ExpertKey(2, 5), record(2), 1)])
    assert temp_files(store.root) == []
    manifest_before = (store.root / MANIFEST).read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        store.write(key, record(3), version=2)
    monkeypatch.undo()
    assert temp_files(store.root) == []
    assert (store.root / MANIFEST).read_bytes() == manifest_before
    flat, version = store.read(key)
    assert same_bits(flat, record(1)) and version == 1


@pytest.mark.parametrize("damage", ["truncate", "flip_data", "flip_header", "delete", "swap"])
def test_damaged_expert_files_are_detected_with_their_path(store: NvmeStore, damage: str):
    key, other = ExpertKey(1, 1), ExpertKey(1, 2)
    store.write_many([(key, record(1), 1), (other, record(2), 1)])
    path = store.path(key)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage in ("flip_data", "flip_header"):
        data[-100 if damage == "flip_data" else 20] ^= 0x01
        path.write_bytes(data)
    elif damage == "delete":
        path.unlink()
    else:  # a complete, valid file of another expert under this name: only the checksum can tell
        path.write_bytes(store.path(other).read_bytes())
    with pytest.raises(StoreCorruptError, match=str(path)) as info:
        store.read(key)
    assert isinstance(info.value, UserError)
    assert store.verify_all() == [str(path)]
    assert same_bits(store.read(other)[0], record(2))


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[]", b'{"format": 1, "layout": {"hidden_size": 64, '
                                     b'"ffn_size": 128}, "experts": {"L000-E00000": {"file": "../../etc/passwd", '
                                     b'"sha256": "' + b"0" * 64 + b'", "version": 1, "bytes": 1}}}'])
def test_corrupt_manifest_is_refused_naming_it(tmp_path: Path, content: bytes):
    root = tmp_path / "nvme"
    NvmeStore(root, LAYOUT).write(ExpertKey(0, 0), record(0), 1)
    (root / MANIFEST).write_bytes(content)
    with pytest.raises(StoreCorruptError, match=str(root / MANIFEST)):
        NvmeStore(root, LAYOUT)


def test_lost_manifest_beside_experts_is_refused(tmp_path: Path):
    root = tmp_path / "nvme"
    NvmeStore(root, LAYOUT).write(ExpertKey(0, 0), record(0), 1)
    (root / MANIFEST).unlink()
    with pytest.raises(StoreCorruptError, match="missing"):
        NvmeStore(root, LAYOUT)


def test_store_opened_with_another_layout_is_refused(tmp_path: Path):
    root = tmp_path / "nvme"
    NvmeStore(root, LAYOUT).write(ExpertKey(0, 0), record(0), 1)
    with pytest.raises(StoreLayoutError, match="hidden=64 ffn=128, opened with hidden=64 ffn=256"):
        NvmeStore(root, ExpertLayout(hidden_size=64, ffn_size=256))


def test_reads_racing_writes_of_the_same_key_see_whole_records(store: NvmeStore):
    """A reader may look up the old checksum and then open the new file; it must retry, not fail."""
    key = ExpertKey(0, 0)
    versions = {v: np.full(LAYOUT.numel, v, dtype=np.float32) for v in range(1, 21)}
    for flat in versions.values():
        flat[LAYOUT.offsets["step"][1]:] = 0  # alignment padding
    store.write(key, versions[1], 1)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(60):
                flat, version = store.read(key)
                assert same_bits(flat, versions[version])
        except BaseException as exc:  # noqa: B036 - reported to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for v in range(2, 21):
        store.write(key, versions[v], v)
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.ray
def test_actor_serves_zero_copy_records_and_rebuilds_from_disk_after_a_restart(ray_local, tmp_path: Path):
    from actors.nvme_store import create_nvme_store

    ray = ray_local
    name, namespace = f"nvme-{uuid.uuid4().hex[:8]}", "test-nvme"
    actor = create_nvme_store(tmp_path / "nvme", LAYOUT, name=name, namespace=namespace)
    try:
        keys = [ExpertKey(layer, expert) for layer in range(2) for expert in range(4)]
        ray.get(actor.write_many.remote([(key, record(i), i + 1) for i, key in enumerate(keys)]))
        assert create_nvme_store(tmp_path / "nvme", LAYOUT, name=name, namespace=namespace) == actor
        with pytest.raises(UserError, match="already serves"):
            create_nvme_store(tmp_path / "other", LAYOUT, name=name, namespace=namespace)

        flat, version = ray.get(actor.read.remote(keys[3]))
        assert same_bits(flat, record(3)) and version == 4
        assert flat.flags.writeable is False  # a view of the shared-memory object store, not a private copy
        before = {key: hashlib.sha256(flat.tobytes()).hexdigest()
                  for key, (flat, _) in zip(keys, ray.get(actor.read_many.remote(keys)), strict=True)}
        stats = ray.get(actor.stats.remote())
        assert stats["reads"] == 1 + len(keys) and stats["writes"] == len(keys) and stats["experts"] == len(keys)

        ray.kill(actor, no_restart=False)  # asynchronous: wait until a new process answers
        deadline = time.time() + 60
        while ray.get(actor.stats.remote())["pid"] == stats["pid"] and time.time() < deadline:
            time.sleep(0.05)
        after_records = ray.get(actor.read_many.remote(keys))
        after = {key: hashlib.sha256(flat.tobytes()).hexdigest()
                 for key, (flat, _) in zip(keys, after_records, strict=True)}
        assert after == before
        assert [version for _, version in after_records] == list(range(1, len(keys) + 1))
        restarted = ray.get(actor.stats.remote())
        assert restarted["pid"] != stats["pid"] and restarted["reads"] == len(keys)
        assert ray.get(actor.keys.remote()) == keys and ray.get(actor.verify_all.remote()) == []
    finally:
        ray.kill(actor, no_restart=True)


def test_staged_writes_are_read_but_only_a_commit_puts_them_in_the_manifest(store: NvmeStore):
    key = ExpertKey(1, 2)
    store.write(key, record(1), version=1)  # committed
    store.write_many([(key, record(2), 2)], commit=False)  # a DRAM write-back between flushes
    assert same_bits(store.read(key)[0], record(2))
    manifest = json.loads((store.root / MANIFEST).read_text())
    assert manifest["experts"][key.name]["version"] == 1
    assert store.commit() == 1
    assert json.loads((store.root / MANIFEST).read_text())["experts"][key.name]["version"] == 2
    assert len(list((store.root / "experts").iterdir())) == 1  # the superseded file is gone


def test_discard_and_a_crash_before_commit_both_return_to_the_last_flush(store: NvmeStore):
    key = ExpertKey(0, 0)
    store.write(key, record(1), version=1)
    store.write_many([(key, record(2), 2)], commit=False)
    assert store.discard_staged() == 1
    assert same_bits(store.read(key)[0], record(1)) and store.version(key) == 1
    store.write_many([(key, record(3), 3)], commit=False)
    with NvmeStore(store.root, LAYOUT) as after_crash:  # the process died before the flush committed
        assert same_bits(after_crash.read(key)[0], record(1)) and after_crash.version(key) == 1
        assert len(list((store.root / "experts").iterdir())) == 1  # the staged file was cleaned up


def _expert_files(root: Path) -> set[str]:
    return {p.name for p in (root / "experts").iterdir()}


def test_restore_returns_to_a_snapshot_after_later_commits_and_reopens(tmp_path: Path):
    """A checkpoint's snapshot survives later flushes (its files are kept) and a reopened store; restoring
    it gives back its records and versions, and drops the later snapshots and the files only they named."""
    root = tmp_path / "nvme"
    keys = [ExpertKey(0, e) for e in range(3)]
    with NvmeStore(root, LAYOUT) as s:
        s.write_many([(k, record(k.expert), 0) for k in keys])
        assert s.snapshot("step_00000005") == 3
        s.write_many([(keys[0], record(10), 1), (keys[1], record(11), 1)])  # a later flush supersedes two
        s.snapshot("step_00000010")
        s.write_many([(keys[0], record(20), 2)], commit=False)  # staged after the last flush
    with NvmeStore(root, LAYOUT) as s:
        assert s.snapshot_tags() == ["step_00000005", "step_00000010"]
        assert s.committed_versions() == {keys[0]: 1, keys[1]: 1, keys[2]: 0}
        s.write(ExpertKey(0, 9), record(99), 0)  # a new write must not reuse a snapshot's file generation
        s.restore("step_00000005")
        assert s.committed_versions() == {keys[0]: 0, keys[1]: 0, keys[2]: 0}
        assert all(same_bits(s.read(k)[0], record(k.expert)) for k in keys)
        assert s.snapshot_tags() == ["step_00000005"]
        assert len(_expert_files(root)) == 3  # only the snapshot's three files are left
    with NvmeStore(root, LAYOUT) as s:
        assert s.committed_versions() == {keys[0]: 0, keys[1]: 0, keys[2]: 0}
        assert all(same_bits(s.read(k)[0], record(k.expert)) for k in keys)


def test_keep_snapshots_deletes_the_others_and_their_files(store: NvmeStore):
    key = ExpertKey(1, 2)
    for step in range(4):
        store.write(key, record(step), step)
        store.snapshot(f"step_{step:08d}", keep=2)
    assert store.snapshot_tags() == ["step_00000002", "step_00000003"]
    assert len(_expert_files(store.root)) == 2
    store.restore("step_00000002")
    assert same_bits(store.read(key)[0], record(2)) and store.version(key) == 2


@pytest.mark.parametrize(("tag", "error"), [("step_00000007", StoreCorruptError), ("../escape", ValueError),
                                            ("", ValueError)])
def test_restore_refuses_unknown_or_path_escaping_tags(store: NvmeStore, tag: str, error: type):
    store.write(ExpertKey(0, 0), record(0), 0)
    store.snapshot("step_00000001")
    with pytest.raises(error, match="snapshot"):
        store.restore(tag)
    assert store.committed_versions() == {ExpertKey(0, 0): 0}


def test_a_corrupt_snapshot_is_reported_with_its_path(tmp_path: Path):
    root = tmp_path / "nvme"
    with NvmeStore(root, LAYOUT) as s:
        s.write(ExpertKey(0, 0), record(0), 0)
        s.snapshot("step_00000001")
    (root / "snapshots" / "step_00000001.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(StoreCorruptError, match=r"snapshots/step_00000001\.json: corrupt manifest"):
        NvmeStore(root, LAYOUT)


# ----------------------------------------------------------------------------- stores written before XXH3

def write_format1_store(root: Path, manifest: dict[ExpertKey, tuple[int, int]],
                        snapshots: dict[str, dict[ExpertKey, tuple[int, int]]]) -> None:
    """A store as the format-1 code left it: one safetensors file per (key, seed) written, a manifest and
    snapshots that name them with their sha256. Values are (seed of the record, version)."""
    from aios_ray.store.nvme import encode_record

    (root / "experts").mkdir(parents=True)
    (root / "snapshots").mkdir()
    files: dict[tuple[ExpertKey, int, int], dict] = {}

    def entries(records: dict[ExpertKey, tuple[int, int]]) -> dict[str, dict]:
        out = {}
        for key, (seed, version) in sorted(records.items()):
            if (key, seed, version) not in files:
                data = encode_record(LAYOUT, key, record(seed), version)
                file = f"experts/{key.name}.{len(files) + 1:09d}.safetensors"
                (root / file).write_bytes(data)
                files[key, seed, version] = {"file": file, "sha256": hashlib.sha256(data).hexdigest(),
                                             "version": version, "bytes": len(data)}
            out[key.name] = files[key, seed, version]
        return out

    def manifest_bytes(records: dict[ExpertKey, tuple[int, int]]) -> bytes:
        data = {"format": 1, "layout": {"hidden_size": 64, "ffn_size": 128}, "experts": entries(records)}
        return (json.dumps(data, indent=1) + "\n").encode()

    for tag, records in snapshots.items():
        (root / "snapshots" / f"{tag}.json").write_bytes(manifest_bytes(records))
    (root / MANIFEST).write_bytes(manifest_bytes(manifest))


def test_a_format1_store_reads_every_record_and_moves_to_xxh3_as_experts_are_written(tmp_path: Path):
    root = tmp_path / "nvme"
    keys = [ExpertKey(layer, e) for layer in range(2) for e in range(3)]
    write_format1_store(root, {k: (i, i + 1) for i, k in enumerate(keys)}, {})
    old_manifest = (root / MANIFEST).read_bytes()
    with NvmeStore(root, LAYOUT) as s:
        assert s.keys() == keys and s.verify_all() == []
        for i, (key, flat, version) in enumerate(s.iter_read(keys)):
            assert same_bits(flat, record(i)) and version == i + 1, key
        assert (root / MANIFEST).read_bytes() == old_manifest  # opening and reading rewrite nothing
        s.write(keys[0], record(50), 7)
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["format"] == 2
    assert set(manifest["experts"][keys[0].name]) == {"file", "xxh3_128", "version", "bytes"}
    assert manifest["experts"][keys[1].name] == json.loads(old_manifest)["experts"][keys[1].name]
    with NvmeStore(root, LAYOUT) as s:  # a manifest mixing both checksums
        assert same_bits(s.read(keys[0])[0], record(50)) and s.version(keys[0]) == 7
        assert all(same_bits(s.read(k)[0], record(i)) for i, k in enumerate(keys) if i)
        assert s.verify_all() == []


def test_a_flipped_byte_in_a_format1_record_is_reported_with_its_path(tmp_path: Path):
    root = tmp_path / "nvme"
    key, other = ExpertKey(0, 1), ExpertKey(0, 2)
    write_format1_store(root, {key: (1, 1), other: (2, 1)}, {})
    with NvmeStore(root, LAYOUT) as s:
        path = s.path(key)
        data = bytearray(path.read_bytes())
        data[-100] ^= 0x01
        path.write_bytes(data)
        with pytest.raises(StoreCorruptError, match=rf"{path}: sha256 mismatch"):
            s.read(key)
        assert s.verify_all() == [str(path)] and same_bits(s.read(other)[0], record(2))


def test_a_format1_snapshot_restores_after_the_store_moved_on(tmp_path: Path):
    """A checkpoint taken before the upgrade: its snapshot (format 1, sha256) and the files it names survive
    opening, later XXH3 writes and a format-2 snapshot; restoring it gives back its records."""
    root = tmp_path / "nvme"
    keys = [ExpertKey(0, e) for e in range(3)]
    write_format1_store(root, {keys[0]: (10, 2), keys[1]: (1, 1), keys[2]: (2, 1)},
                        {"step_00000001": {k: (k.expert, 1) for k in keys}})
    with NvmeStore(root, LAYOUT) as s:
        assert s.snapshot_tags() == ["step_00000001"]
        s.write_many([(keys[1], record(11), 2), (keys[2], record(12), 2)])
        s.snapshot("step_00000002")
        s.restore("step_00000001")
        assert s.committed_versions() == dict.fromkeys(keys, 1)
        assert all(same_bits(s.read(k)[0], record(k.expert)) for k in keys)
    with NvmeStore(root, LAYOUT) as s:
        assert all(same_bits(s.read(k)[0], record(k.expert)) for k in keys) and s.verify_all() == []


@pytest.mark.parametrize(("fmt", "checksum", "digits"), [(1, "xxh3_128", 32), (2, "xxh3_128", 64), (2, "md5", 32),
                                                         (3, "xxh3_128", 32)])
def test_manifest_entries_with_a_checksum_their_format_does_not_allow_are_refused(
        tmp_path: Path, fmt: int, checksum: str, digits: int):
    root = tmp_path / "nvme"
    NvmeStore(root, LAYOUT).write(ExpertKey(0, 0), record(0), 1)
    manifest = json.loads((root / MANIFEST).read_text())
    entry = manifest["experts"]["L000-E00000"]
    del entry["xxh3_128"]
    entry[checksum] = "0" * digits
    manifest["format"] = fmt
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreCorruptError, match=str(root / MANIFEST)):
        NvmeStore(root, LAYOUT)
