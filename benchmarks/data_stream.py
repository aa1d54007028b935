"""Large-corpus bar: Ray Data preparation throughput against in-process tokenization, and a training worker's
memory while it streams the prepared corpus.

1. The corpus (``make_text_corpus.py``, >= 1 GiB of text under /tmp) is cut into the pieces ``data prepare`` uses
   and a byte-level BPE is trained on a bounded sample; both paths below use that tokenizer.
2. In process: the current path's tokenizer call (``tokenize_documents``, batched ``encode_batch`` on every core)
   over the pieces (``--baseline-fraction`` of them, spread over the corpus), one piece at a time.
3. Ray Data: ``prepare_dataset`` on a local Ray with the same cores, the whole corpus, from reading the sources
   to the written manifest (hashing, tokenizing, Parquet writes all counted).
   ``prepare_vs_inprocess`` = Ray Data's MiB/s over the in-process MiB/s (bar: >= 0.9).
4. One Ray Train worker (``TorchTrainer``, 1 CPU) streams ``--epochs`` epochs of every training block through the
   ``ShardSampler`` the training loop uses (on Ray: a Ray Data stream read with ``iter_torch_batches``); its
   peak RSS (``ru_maxrss``, the whole process: Python, torch, Ray, and any object-store pages it maps) over the
   corpus' token bytes (tokens x 4, int32 as the in-memory path holds them) is ``worker_peak_rss_share``
   (bar: < 0.25). Its peak after each epoch shows whether it still grows with the blocks streamed; its
   resident memory by kind (own, files, shared) at start and end is printed too.

    python benchmarks/make_text_corpus.py --out /tmp/aios_corpus --gib 3.0
    python benchmarks/data_stream.py --corpus /tmp/aios_corpus --work /tmp/aios_data_stream
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def inprocess_rate(pieces: list, tokenizer_json: str, fraction: float) -> tuple[float, int]:
    """MiB/s of the in-process tokenizer (batched, every core) over every k-th piece."""
    from tokenizers import Tokenizer

    from aios_ray.data.dataset import tokenize_documents
    from aios_ray.data.prepare_shards import piece_documents
    from aios_ray.data.tokenizer import eos_id

    tokenizer = Tokenizer.from_str(tokenizer_json)
    step = max(1, round(1 / fraction))
    chosen = pieces[::step]
    seconds, size = 0.0, 0
    for piece in chosen:
        started = time.perf_counter()
        tokenize_documents(tokenizer, piece_documents(piece), eos_id(tokenizer))  # reading counted, as in prepare
        seconds += time.perf_counter() - started
        size += piece.size
    return size / (1 << 20) / seconds, len(chosen)


def stream_worker(config: dict[str, Any]) -> None:
    """A Ray Train worker: ``epochs`` epochs of its shards through the training loop's sampler, as a Ray worker
    streams (Ray Data, ``iter_torch_batches``); reports its peak RSS after each epoch. A peak that stops rising
    after the first epoch is memory bounded by the stream, not by the blocks it has seen."""
    from aios_ray.data.shards import ShardSampler, read_manifest

    before, at_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss_parts()
    sampler = ShardSampler(read_manifest(Path(config["data"])), config["batch_size"], seed=0, reader="ray")
    checksum, blocks, peaks = 0, 0, []
    started = time.perf_counter()
    for _ in range(config["epochs"]):
        epoch_done = False
        while not epoch_done:
            ids, labels = sampler.next_batch()  # the first of an epoch moves the sampler on to it
            checksum += int(ids[:, 0].sum())  # touch every batch
            blocks += len(ids)
            epoch_done = sampler.state.batch >= sampler.batches_per_epoch
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    sampler.close()
    # a file, not ray.train.report: Train V2 keeps a report's metrics only with a checkpoint attached
    Path(config["result"]).write_text(json.dumps({
        "peak_rss": peaks[-1], "peaks_by_epoch": peaks, "rss_before_streaming": before, "blocks": blocks,
        "seconds": time.perf_counter() - started, "checksum": checksum, "at_start": at_start,
        "at_end": rss_parts()}))


def rss_parts() -> dict[str, int]:
    """This process's resident memory now, by kind (bytes): its own (anon), mapped files, and shared memory (the
    node's object store pages it has mapped)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("RssAnon", "RssFile", "RssShmem") if key in fields}


def stream_on_ray_train(data: str, batch_size: int, epochs: int, storage: Path) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage.mkdir(parents=True, exist_ok=True)
    result = storage / "stream.json"
    trainer = TorchTrainer(stream_worker, train_loop_config={"data": data, "batch_size": batch_size, "epochs": epochs,
                                                             "result": str(result)},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name="data-stream", storage_path=str(storage)))
    trainer.fit()
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="/tmp/aios_corpus", help="made with make_text_corpus.py when absent")
    parser.add_argument("--gib", type=float, default=3.0, help="size of a corpus made here")
    parser.add_argument("--work", default="/tmp/aios_data_stream", help="tokenizer, prepared shards, Ray results")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024, help="--dataset-chunk-size: blocks per shard")
    parser.add_argument("--piece-mb", type=float, default=16.0)
    parser.add_argument("--baseline-fraction", type=float, default=0.25,
                        help="share of the pieces (every k-th) the in-process baseline tokenizes")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="epochs the worker streams (peak RSS after each)")
    args = parser.parse_args(argv)

    import ray

    from aios_ray.data import prepare_shards as prep

    corpus, work = Path(args.corpus), Path(args.work)
    if not corpus.exists():
        from benchmarks.make_text_corpus import write_corpus

        write_corpus(corpus, int(args.gib * (1 << 30)), 64 << 20, seed=0)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pieces, _ = prep.plan_pieces(prep.source_files(str(corpus)), int(args.piece_mb * (1 << 20)))
    total = sum(p.size for p in pieces)
    spec = prep.PrepareSpec(dataset=str(corpus), out=str(work / "prepared"), max_seq_len=args.max_seq_len,
                       chunk_blocks=args.chunk, vocab_size=args.vocab, tokenizer_sample_mb=16,
                       piece_mb=args.piece_mb)
    tokenizer, _ = prep.resolve_tokenizer(spec, pieces)
    (work / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    spec.tokenizer = str(work / "tokenizer.json")
    print(f"corpus: {total / (1 << 30):.2f} GiB of text in {len(pieces)} pieces; cpus {os.cpu_count()}", flush=True)

    baseline, sampled = inprocess_rate(pieces, tokenizer.to_str(), args.baseline_fraction)
    print(f"in-process tokenization (encode_batch, {sampled} pieces): {baseline:.2f} MiB/s", flush=True)

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    summary = prep.prepare_dataset(spec)
    prepare_seconds = time.perf_counter() - started
    on_ray = total / (1 << 20) / prepare_seconds
    print(f"ray data prepare: {prepare_seconds:.1f} s, {on_ray:.2f} MiB/s; {summary['tokens']:,} tokens, "
          f"{summary['train_blocks']:,} train blocks in {summary['shards']:,} shards", flush=True)

    streamed = stream_on_ray_train(summary["out"], args.batch_size, args.epochs, work / "ray_results")
    token_bytes = summary["tokens"] * 4
    print(f"stream: {streamed['blocks']:,} blocks in {streamed['seconds']:.1f} s; worker RSS before streaming "
          f"{streamed['rss_before_streaming'] / (1 << 20):.0f} MiB, peak {streamed['peak_rss'] / (1 << 20):.0f} MiB; "
          f"corpus token bytes {token_bytes / (1 << 20):.0f} MiB", flush=True)
    print("worker peak RSS after each epoch: "
          + ", ".join(f"{peak / (1 << 20):.0f} MiB" for peak in streamed["peaks_by_epoch"]), flush=True)
    for when in ("at_start", "at_end"):
        parts = ", ".join(f"{kind} {size / (1 << 20):.0f} MiB" for kind, size in streamed[when].items())
        print(f"worker memory {when.replace('_', ' ')}: {parts}", flush=True)
    print(f"prepare_vs_inprocess={on_ray / baseline:.3f}")
    print(f"worker_peak_rss_share={streamed['peak_rss'] / token_bytes:.3f}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
