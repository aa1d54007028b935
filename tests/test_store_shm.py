"""Shared-memory hygiene: no hot-tier slab (a /dev/shm file, i.e. RAM) outlives its run.

Real files in /dev/shm and real processes: a run ends with its slab unlinked however it ends; a slab whose
process was SIGKILLed is reclaimed by the next run of its store and by ``aios-ray store gc``; a slab that a live
process holds or maps is never touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aios_ray.cli import main
from aios_ray.config import StoreConfig
from aios_ray.store import control
from aios_ray.store.control import LocalStore
from aios_ray.store.orphans import slab_files, sweep
from aios_ray.store.record import ExpertLayout
from aios_ray.store.slab import Slab, slab_path
from tests.helpers import events

SAMPLE = Path(__file__).resolve().parents[1] / "aios_ray" / "data" / "sample" / "train.txt"
LAYOUT = ExpertLayout(8, 16)

# A run of the store at argv[1] named argv[2] that holds its slab until it is killed.
HOLDER = """
import sys, time
from aios_ray.config import StoreConfig
from aios_ray.store.control import LocalStore
from aios_ray.store.record import ExpertLayout
store = LocalStore(StoreConfig(experts="tiered", path=sys.argv[1], name=sys.argv[2], device="cpu", capacity_gpu=4,
                               capacity_dram=4), ExpertLayout(8, 16))
store.slab.row(0).fill_(1.0)
print(store.slab.path, flush=True)
time.sleep(600)
"""

# A process that maps the file argv[1] and takes no lock (as code from before the locks did).
MAPPER = """
import mmap, sys, time
with open(sys.argv[1], "r+b") as f:
    mapping = mmap.mmap(f.fileno(), 0)
print("mapped", flush=True)
time.sleep(600)
"""


def _store_config(root: Path, name: str) -> StoreConfig:
    return StoreConfig(experts="tiered", path=str(root), name=name, device="cpu", capacity_gpu=4, capacity_dram=4)


def _spawn(script: str, *args: str) -> tuple[subprocess.Popen, str]:
    """Start ``script`` and wait for its first line (it is ready then)."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line, f"{script.strip().splitlines()[-2]}: the process ended before it was ready (rc {proc.wait()})"
    return proc, line


def _end(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout and proc.stdout.close()


def _train(tmp_path: Path, *flags: str) -> int:
    """``aios-ray train --no-ray --experts tiered`` on a 20 kB corpus (seconds)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(SAMPLE.read_bytes()[:20000])
    return main(["train", "--config", "debug", "--no-ray", "--experts", "tiered", "--dataset-file", str(corpus),
                 "--tokenizer-vocab-size", "300", "--bundle-dir", str(tmp_path / "brains"), "--brain-name", "shm",
                 *flags])


def _start_training(tmp_path: Path, corpus: Path, bundle: Path, *flags: str,
                    new_session: bool = False) -> subprocess.Popen:
    """`aios-ray train --iterate` with tiered experts on ``corpus`` into ``bundle``, output in out.txt."""
    with (tmp_path / "out.txt").open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "aios_ray", "train", "--config", "debug", *flags,
                                 "--experts", "tiered", "--dataset-file", str(corpus), "--tokenizer-vocab-size", "300",
                                 "--bundle-dir", str(bundle.parent), "--brain-name", bundle.name, "--iterate"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=new_session)


def _wait_for_a_step(proc: subprocess.Popen, bundle: Path, tmp_path: Path) -> None:
    deadline = time.monotonic() + 300  # a guard against a hung run, not a speed requirement
    while not (bundle / "metrics.jsonl").is_file() or not events(bundle / "metrics.jsonl", "train"):
        assert proc.poll() is None, (tmp_path / "out.txt").read_text()
        assert time.monotonic() < deadline, "the run never trained a step"
        time.sleep(0.2)


@pytest.fixture
def made_slabs(monkeypatch) -> list[Path]:
    """The slab files the in-process store creates (each existed, mapped, while its run trained)."""
    made: list[Path] = []
    create = control.new_store_slab

    def spy(*args, **kwargs) -> Slab:
        slab = create(*args, **kwargs)
        made.append(slab.path)
        assert slab.path.is_file()
        return slab

    monkeypatch.setattr(control, "new_store_slab", spy)
    return made


def test_a_run_removes_its_slab_when_it_succeeds_and_when_it_fails_on_a_user_error(tmp_path: Path, made_slabs,
                                                                                   capsys):
    assert _train(tmp_path, "--steps", "2") == 0
    assert len(made_slabs) == 1 and not made_slabs[0].exists()
    bundle = tmp_path / "brains" / "shm"
    (bundle / "expert_store" / "snapshots" / "step_00000002.json").unlink()  # the checkpoint's store state is lost
    capsys.readouterr()
    assert _train(tmp_path, "--model", str(bundle), "--steps", "2") == 2  # the resume fails once the store is open
    assert "no snapshot 'step_00000002'" in capsys.readouterr().err
    assert len(made_slabs) == 2 and not made_slabs[1].exists()


def test_a_run_stopped_by_its_stop_file_removes_its_slab(tmp_path: Path, made_slabs):
    stop = tmp_path / "STOP"
    stop.touch()  # --iterate runs until the stop file appears: here it stops after its first step
    assert _train(tmp_path, "--iterate", "--stop-file", str(stop)) == 0
    assert events(tmp_path / "brains" / "shm" / "metrics.jsonl", "run_end")[-1]["stopped"] is True
    assert len(made_slabs) == 1 and not made_slabs[0].exists()


def test_ctrl_c_ends_a_run_with_its_slab_removed(tmp_path: Path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(SAMPLE.read_bytes()[:20000])
    bundle = tmp_path / "brains" / "shm"
    slab = slab_path("local", "shm", str(bundle / "expert_store"))
    proc = _start_training(tmp_path, corpus, bundle, "--no-ray")
    try:
        _wait_for_a_step(proc, bundle, tmp_path)
        assert slab.is_file()  # training: the slab is there
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 130, (tmp_path / "out.txt").read_text()
        assert "interrupted" in (tmp_path / "out.txt").read_text()
        assert not slab.exists()
    finally:
        _end([proc])
        sweep(str(bundle / "expert_store"))


def test_the_slab_of_a_killed_run_is_reclaimed_when_the_next_run_of_its_store_starts(tmp_path: Path, capsys):
    root = tmp_path / "store"
    crashed, path = _spawn(HOLDER, str(root), "crashed")
    crashed.send_signal(signal.SIGKILL)
    _end([crashed])
    assert Path(path).is_file()  # kill -9: nothing of the run's own cleanup ran
    store = LocalStore(_store_config(root, "next"), LAYOUT)  # another name: its own slab is another file
    try:
        assert not Path(path).exists() and store.slab.path.is_file()
        assert f"removed 1 orphaned hot-tier slab(s) of {root}" in capsys.readouterr().out
    finally:
        store.close()
    assert not store.slab.path.exists()


def test_store_gc_removes_orphans_and_never_a_slab_that_a_live_process_holds_or_maps(tmp_path: Path, capsys):
    root = tmp_path / "store"
    procs: list[subprocess.Popen] = []
    try:
        for name in ("a", "b"):  # two runs of the store at once
            procs.append(_spawn(HOLDER, str(root), name)[0])
        live = [slab_path("local", name, str(root)) for name in ("a", "b")]
        old = slab_path("local", "old", str(root))  # mapped by a process that takes no lock
        old.write_bytes(bytes(4096))
        procs.append(_spawn(MAPPER, str(old))[0])
        crashed, orphan = _spawn(HOLDER, str(root), "crashed")
        crashed.send_signal(signal.SIGKILL)
        _end([crashed])
        orphan = Path(orphan)
        assert set(slab_files(str(root))) == {*live, old, orphan}

        assert main(["store", "gc", "--dry-run", "--store-path", str(root)]) == 0
        out = capsys.readouterr().out
        # 4 slots of 1168 floats (18.2 kB); the 4672 bytes of slot 0 were written: two pages of RAM
        assert f"would remove {orphan}  18.2 kB file, 8.0 kB of RAM" in out
        assert "would remove 1 orphaned slab(s)" in out and "3 in use left alone" in out
        assert set(slab_files(str(root))) == {*live, old, orphan}  # a dry run removes nothing

        assert main(["store", "gc", "--store-path", str(root)]) == 0
        out = capsys.readouterr().out
        assert f"removed {orphan}" in out and "3 in use left alone (held by pid " in out
        assert all(str(proc.pid) in out for proc in procs)
        assert set(slab_files(str(root))) == {*live, old}

        # The next run of the store (while both runs still hold theirs) reclaims nothing of theirs either.
        store = LocalStore(_store_config(root, "next"), LAYOUT)
        store.close()
        assert set(slab_files(str(root))) == {*live, old}
        assert all(Slab(path, 4, LAYOUT.numel, create=False).row(0)[0].item() == 1.0 for path in live)  # intact
    finally:
        _end(procs)
    # Their processes gone, the slabs are orphans: the sweep takes every one.
    assert {found.path for found in sweep(str(root))} == {*live, old}
    assert slab_files(str(root)) == []


def test_store_gc_on_a_store_without_slabs_says_so(tmp_path: Path, capsys):
    assert main(["store", "gc", "--store-path", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "removed 0 orphaned slab(s), 0.0 kB of RAM; 0 in use left alone"


def test_the_session_fixture_fails_a_test_run_that_leaks_a_slab(tmp_path: Path):
    """The suite's own guard, run on a suite with one leaking test: the run fails and names the slab, which is
    removed."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (suite / "test_leak.py").write_text(
        "from aios_ray.config import StoreConfig\n"
        "from aios_ray.store.control import LocalStore\n"
        "from aios_ray.store.record import ExpertLayout\n"
        "KEPT = []\n\n"
        "def test_forgets_to_close(tmp_path):\n"
        "    KEPT.append(LocalStore(StoreConfig(experts='tiered', path=str(tmp_path), name='leak', device='cpu',\n"
        "                                       capacity_gpu=2, capacity_dram=2), ExpertLayout(8, 16)))\n"
        "    print('SLAB', KEPT[0].slab.path)\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(suite)],
                            cwd=suite, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    leaked = next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("SLAB "))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed, 1 error" in result.stdout
    assert f"the tests leaked 1 hot-tier slab(s) in shared memory (removed now): {leaked}" in result.stdout
    assert not Path(leaked).exists()


@pytest.mark.slow
@pytest.mark.ray
def test_a_ray_run_stopped_by_its_stop_file_removes_its_slab(ray_local, tmp_path: Path):
    import dataclasses

    from aios_ray.train.run import run_training
    from tests.helpers import debug_config

    stop = tmp_path / "STOP"
    stop.touch()
    cfg = debug_config(tmp_path, experts="tiered", iterate=True, stop_file=str(stop))
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, use_ray=True))
    plan, _ = run_training(cfg)
    assert events(plan.log_file, "run_end")[-1]["stopped"] and events(plan.log_file, "store_stats")  # tiered
    assert slab_files(str(Path(plan.bundle_root) / "expert_store")) == []


@pytest.mark.slow
@pytest.mark.ray
def test_ctrl_c_ends_a_ray_run_with_its_slab_removed(tmp_path: Path):
    """Ctrl-C in a terminal signals the whole foreground process group: the driver and the Ray it started."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(SAMPLE.read_bytes()[:20000])
    bundle = tmp_path / "brains" / "shm"
    proc = _start_training(tmp_path, corpus, bundle, new_session=True)  # the run and the local Ray it starts
    try:
        _wait_for_a_step(proc, bundle, tmp_path)
        assert slab_files(str(bundle / "expert_store"))  # training: the GPU cache actor's slab is there
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(180)
        assert slab_files(str(bundle / "expert_store")) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        sweep(str(bundle / "expert_store"))


@pytest.mark.slow  # ~55 s: two Ray Train runs, the failing one retried once
@pytest.mark.ray
def test_a_ray_run_that_fails_on_a_user_error_removes_its_slab(ray_local, tmp_path: Path, capsys):
    """On Ray the slab belongs to the store's cache actor: a run that fails once the store is up ends it too."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(SAMPLE.read_bytes()[:20000])
    bundle = tmp_path / "brains" / "shm-ray"
    args = ["train", "--config", "debug", "--experts", "tiered", "--dataset-file", str(corpus),
            "--tokenizer-vocab-size", "300", "--bundle-dir", str(bundle.parent), "--brain-name", bundle.name,
            "--steps", "2"]
    assert main(args) == 0
    store = bundle / "expert_store"
    assert slab_files(str(store)) == []
    (store / "snapshots" / "step_00000002.json").unlink()  # the checkpoint's store state is lost
    capsys.readouterr()
    assert main([*args, "--model", str(bundle)]) == 2
    assert "no snapshot 'step_00000002'" in capsys.readouterr().err
    assert slab_files(str(store)) == []
