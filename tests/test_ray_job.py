"""`ray job submit` against a head started with `ray start --head` on this machine, as the README shows."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    """Ports the OS hands out now; held together so that the n differ."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_pids(sid: int) -> list[int]:
    """Every process in session `sid`: the head's gcs, raylet, dashboard and the workers they started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Field 6 of /proc/PID/stat is the session id; the command name (field 2) may hold spaces.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def _stop_head(head: subprocess.Popen[bytes]) -> None:
    """Stops this test's head and nothing else. `ray stop` would also stop any other Ray started with
    `ray start` on the machine, so the head runs with --block in its own session: SIGTERM lets it shut its
    processes down, and whatever is left of that session after a grace period is killed."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=20)
    deadline = time.monotonic() + 10
    while (pids := _session_pids(head.pid)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    if head.poll() is None:
        head.wait(timeout=5)
    assert not _session_pids(head.pid), "processes of the test's Ray head outlived it"


@pytest.fixture
def ray_head() -> Iterator[tuple[str, Path]]:
    """A head node started like the README's `ray start --head`, on free ports and its own --temp-dir so that
    it cannot meet another Ray on this machine. Yields the job API address and a scratch directory."""
    # A short path under /tmp: Ray's unix sockets live below --temp-dir and their paths are capped at 107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="aios-rj-", dir="/tmp"))
    gcs, dashboard, client, agent = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update({
        # The job's entry point is resolved on the head's PATH: the venv's `aios-ray`, run by the venv's Python.
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_AUTH_MODE": "disabled",
        # On SIGTERM the head would otherwise wait up to 30 s for a drain nobody needs here.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # Processes of this head that look their cluster up with address "auto" (Ray Train's placement group
        # cleaner does) would otherwise find every Ray on the machine and fail with "multiple active Ray
        # instances"; `ray start` itself does not read this variable.
        "RAY_ADDRESS": f"127.0.0.1:{gcs}",
    })
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           # Both default to fixed ports (10001, 52365) that another Ray on the machine may hold.
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--num-cpus", "2", "--object-store-memory", str(100 * 1024**2), "--temp-dir", str(tmp / "ray")]
    log = (tmp / "head.log").open("wb")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, (tmp / "head.log").read_text()[-3000:]
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield address, tmp
    finally:
        _stop_head(head)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_working_dir_upload_leaves_out_git_venv_and_artifacts(tmp_path: Path):
    """The package `ray job submit --working-dir .` uploads: .gitignore and .rayignore keep it to the sources."""
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / "pkg.zip"
    create_package(str(REPO), target, include_gitignore=True, logger=None)
    names = zipfile.ZipFile(target).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert {"aios_ray", "actors", "configs", "pyproject.toml"} <= tops
    assert not tops & {".git", ".venv", "artifacts", ".pytest_cache", ".ruff_cache"}
    assert not any("__pycache__" in name for name in names)
    assert target.stat().st_size < 20 * 1024**2


@pytest.mark.ray
def test_ray_job_submit_trains_a_bundle(ray_head: tuple[str, Path]):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, tmp = ray_head
    bundle_dir = tmp / "brains"
    submission_id = f"aios-ray-job-test-{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")} | {"RAY_AUTH_MODE": "disabled"}
    submit = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--no-wait",
         "--submission-id", submission_id, "--",
         "aios-ray", "train", "--config", "debug", "--steps", "4", "--bundle-dir", str(bundle_dir),
         "--brain-name", "jobtest"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr

    client = JobSubmissionClient(address)
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    deadline = time.monotonic() + 300  # a guard against a hung job, not a timing assertion
    while (status := client.get_job_status(submission_id)) not in terminal and time.monotonic() < deadline:
        time.sleep(1)
    logs = client.get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]

    # The job ran from the uploaded package (Ray unpacks it as the job's cwd and first entry of PYTHONPATH).
    info = client.get_job_info(submission_id)
    assert info.runtime_env["working_dir"].startswith("gcs://")
    assert "done: step 4" in logs
    assert "multiple active Ray instances" not in logs

    bundle = bundle_dir / "jobtest"
    for name in ("metadata.json", "model.safetensors", "metrics.jsonl", "config.json", "tokenizer.json"):
        assert (bundle / name).is_file(), f"{name} missing from {sorted(p.name for p in bundle.iterdir())}"
    assert (bundle / "model.safetensors").stat().st_size > 0
    json.loads((bundle / "metadata.json").read_text())
    events = [json.loads(line) for line in (bundle / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_steps = [e["step"] for e in events if e.get("event") == "train"]
    assert train_steps and max(train_steps) == 4
