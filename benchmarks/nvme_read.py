"""Read throughput of the NVMe store, through its Ray actor, against plain sequential file reads.

What: 256 expert records of ~4 MiB (hidden=256, ffn=455: 1,048,321 fp32 = 4,193,284 bytes) written by
``NvmeStore`` under a temp dir in /tmp. Timed passes, interleaved in one process after a warm-up round:

* ``ours``   the driver asks the ``NvmeStoreActor`` for all records (``read_many`` batches, up to
             ``MAX_CONCURRENCY`` calls in flight) and ``ray.get``s each one out of the object store;
             checksums verified, records delivered as flat fp32 arrays in shared memory.
* ``plain``  ``open(path, 'rb').read()`` of the same 256 files, one after the other.
* ``direct`` (diagnostic) ``NvmeStore.iter_read`` in the driver (read-ahead with WILLNEED): no Ray.
* ``direct1`` (diagnostic) ``NvmeStore.read`` one key after the other: what read-ahead buys.

Before every timed pass the page cache of all 256 files is dropped (``posix_fadvise(DONTNEED)`` per file, or
``/proc/sys/vm/drop_caches`` with ``--drop-caches``), and the drop is checked against /proc/meminfo.
``nvme_read_ratio`` is the median per-round ratio of bytes/s, ours over plain (bar: >= 0.9).

A warm-cache "decode" section compares ways to turn a file into a verified flat record: read bytes then
``safetensors.numpy.load`` + concatenate, read bytes then slice-copy each tensor, and the store's one pass
(``readinto`` each tensor's slot, hashing the same memory); all three verify XXH3-128 like the store. It also
prints what sha256 (the store's checksum before XXH3) and XXH3-128 alone cost on one core.

    .venv/bin/python benchmarks/nvme_read.py [--experts 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xxhash

from aios_ray.store.nvme import NvmeStore
from aios_ray.store.record import PARTS, ExpertKey, ExpertLayout

LAYOUT = ExpertLayout(hidden_size=256, ffn_size=455)  # 4,193,284 bytes a record
MiB = 1024**2


def cached_mib() -> float:
    """Page cache size, to check that a drop really dropped."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def drop_cache(paths: list[Path], system_wide: bool) -> str:
    """Evict the files from the page cache; returns the method used.

    ``posix_fadvise(DONTNEED)`` per file is the default: it touches only our files, while
    ``/proc/sys/vm/drop_caches`` (``--drop-caches``) empties the cache of everyone on the machine.
    The files are fsynced by the store, so their pages are clean and DONTNEED can drop them.
    """
    if system_wide:
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "drop_caches"
        except OSError:
            pass
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED)"


def make_store(root: Path, n: int) -> tuple[NvmeStore, list[ExpertKey]]:
    keys = [ExpertKey(i // 64, i % 64) for i in range(n)]
    rng = np.random.default_rng(0)
    store = NvmeStore(root, LAYOUT)
    for start in range(0, n, 16):
        store.write_many([(k, rng.standard_normal(LAYOUT.numel, dtype=np.float32), 1) for k in keys[start:start + 16]])
    return store, keys


def pass_plain(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            total += len(f.read())
    return total


def pass_direct(store: NvmeStore, keys: list[ExpertKey]) -> int:
    return sum(flat.nbytes for _, flat, _ in store.iter_read(keys))


def pass_direct_serial(store: NvmeStore, keys: list[ExpertKey]) -> int:
    return sum(store.read(key)[0].nbytes for key in keys)


def pass_ours(ray, actor, keys: list[ExpertKey], batch: int, inflight: int) -> int:
    """Pipeline read_many calls; ray.get each result in the driver (zero-copy out of the object store)."""
    batches = [keys[i:i + batch] for i in range(0, len(keys), batch)]
    pending, total = [], 0
    while batches or pending:
        while batches and len(pending) < inflight:
            pending.append(actor.read_many.remote(batches.pop(0)))
        ready, pending = ray.wait(pending, num_returns=1)
        total += sum(flat.nbytes for flat, _ in ray.get(ready[0]))  # arrays dropped here: object freed
    return total


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_cold(fn: Callable[[], int], paths: list[Path], system_wide: bool, actor_pid: int) -> dict[str, float]:
    """One pass after dropping the files' cache: bytes/s, CPU seconds (driver + store actor), MiB dropped."""
    before = cached_mib()
    method = drop_cache(paths, system_wide)
    dropped = before - cached_mib()
    cpu0, start = time.process_time() + process_cpu(actor_pid), time.perf_counter()
    nbytes = fn()
    seconds = time.perf_counter() - start
    cpu = time.process_time() + process_cpu(actor_pid) - cpu0
    return {"rate": nbytes / seconds, "cpu_per_gib": cpu / (nbytes / 1024**3), "dropped": dropped, "method": method}


def decode_bytes_load(path: Path) -> np.ndarray:
    from safetensors.numpy import load

    data = path.read_bytes()
    xxhash.xxh3_128_hexdigest(data)
    parts = load(data)
    flat = np.zeros(LAYOUT.numel, dtype=np.float32)  # records are padded to 64 bytes after the last part
    np.concatenate([parts[name].ravel() for name in PARTS], out=flat[:LAYOUT.offsets[PARTS[-1]][1]])
    return flat


def decode_bytes_slice(path: Path) -> np.ndarray:
    data = path.read_bytes()
    xxhash.xxh3_128_hexdigest(data)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    flat = np.zeros(LAYOUT.numel, dtype=np.float32)  # the padding after the last part stays 0
    for name, (a, b) in LAYOUT.offsets.items():
        begin, end = header[name]["data_offsets"]
        flat[a:b] = np.frombuffer(data, np.float32, (end - begin) // 4, 8 + n + begin)
    return flat


def decode_section(store: NvmeStore, keys: list[ExpertKey], rounds: int) -> None:
    """Warm page cache, one thread: which way of building the verified flat record is cheapest."""
    sample = keys[:32]
    paths = [store.path(k) for k in sample]
    methods = {"bytes+safetensors.load+concat": lambda: [decode_bytes_load(p) for p in paths],
               "bytes+slice copy": lambda: [decode_bytes_slice(p) for p in paths],
               "readinto slots (store)": lambda: [store._read_file(store._entries[k]) for k in sample]}
    expect = store.read(sample[0])[0]
    assert all(np.array_equal(m()[0], expect) for m in methods.values())
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    size = sum(p.stat().st_size for p in paths)
    buf = np.random.default_rng(1).bytes(64 * MiB)
    alone = {}
    for name, digest in (("sha256", lambda b: hashlib.sha256(b).hexdigest()), ("xxh3_128", xxhash.xxh3_128_hexdigest)):
        start = time.perf_counter()
        digest(buf)
        alone[name] = len(buf) / (time.perf_counter() - start)
    print(f"decode (warm cache, 1 thread, {len(paths)} files): " + ", ".join(
        f"{name} alone {rate / MiB:.0f} MiB/s" for name, rate in alone.items()))
    for name, ts in times.items():
        print(f"decode {name:>30}: median {size / statistics.median(ts) / MiB:7.0f} MiB/s")


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    df = subprocess.run(["df", "-h", "/tmp"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return f"{platform.machine()} '{cpu}', nproc={os.cpu_count()}, df -h /tmp: {' '.join(df.split())}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="keys per read_many call")
    parser.add_argument("--drop-caches", action="store_true",
                        help="write 3 to /proc/sys/vm/drop_caches (whole machine) instead of fadvise per file")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from actors.nvme_store import MAX_CONCURRENCY, create_nvme_store

    print(f"machine: {machine()}, load average {os.getloadavg()[0]:.2f}")
    tmp = Path(tempfile.mkdtemp(prefix="nvme-bench-", dir="/tmp"))
    try:
        store, keys = make_store(tmp / "store", args.experts)
        paths = [store.path(k) for k in keys]
        total = sum(p.stat().st_size for p in paths)
        print(f"records: {len(keys)} x {LAYOUT.nbytes} bytes (hidden={LAYOUT.hidden_size} ffn={LAYOUT.ffn_size}), "
              f"files {total / MiB:.0f} MiB")
        decode_section(store, keys, args.rounds)

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=1024 * MiB)
        actor = create_nvme_store(tmp / "store", LAYOUT, name="nvme-bench", namespace="bench")
        passes = {"ours": lambda: pass_ours(ray, actor, keys, args.batch, MAX_CONCURRENCY),
                  "plain": lambda: pass_plain(paths),
                  "direct": lambda: pass_direct(store, keys),
                  "direct1": lambda: pass_direct_serial(store, keys)}
        actor_pid = int(ray.get(actor.stats.remote())["pid"])
        rows: dict[str, list[dict]] = {name: [] for name in passes}
        for round_ in range(args.rounds + 1):  # round 0 is the warm-up
            results = {name: timed_cold(fn, paths, args.drop_caches, actor_pid) for name, fn in passes.items()}
            if round_:
                for name, result in results.items():
                    rows[name].append(result)
                print(f"round {round_}: " + "  ".join(f"{n} {r['rate'] / MiB:6.0f} MiB/s" for n, r in results.items()))
        report(rows, total)
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(rows: dict[str, list[dict]], total: int) -> None:
    drops = [r["dropped"] for results in rows.values() for r in results]
    methods = sorted({r["method"] for results in rows.values() for r in results})
    cold = statistics.median(drops) > 0.8 * total / MiB
    print(f"cache: {', '.join(methods)}; page cache dropped before each pass: median "
          f"{statistics.median(drops):.0f} MiB of {total / MiB:.0f} MiB of files -> {'COLD' if cold else 'WARM'}")
    for name, results in rows.items():
        rates = [r["rate"] / MiB for r in results]
        cpu = statistics.median(r["cpu_per_gib"] for r in results)
        print(f"{name:>7}: median {statistics.median(rates):6.0f} MiB/s  max {max(rates):6.0f} MiB/s  "
              f"CPU {cpu:.2f} s/GiB (driver + store actor)")

    def ratio(name: str) -> float:
        return statistics.median(a["rate"] / b["rate"] for a, b in zip(rows[name], rows["plain"], strict=True))

    print(f"nvme_read_ratio_direct={ratio('direct'):.3f}  (store without Ray / plain)")
    print(f"nvme_read_ratio_direct1={ratio('direct1'):.3f}  (store without Ray or read-ahead / plain)")
    print(f"nvme_read_ratio={ratio('ours'):.3f}")
    print(f"load average after: {os.getloadavg()[0]:.2f} (other processes on these 2 cores lower the ratio: ours "
          f"needs more CPU than plain)")


if __name__ == "__main__":
    main()
