"""``aios-ray data prepare``: its flags and command (registered by ``aios_ray.cli``)."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(commands: argparse._SubParsersAction, parser_class: type[argparse.ArgumentParser]) -> None:
    data = commands.add_parser("data", help="datasets larger than one process: prepare Parquet token shards")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=parser_class)
    prepare = data_commands.add_parser(
        "prepare", help="tokenize text on Ray Data into fixed-length token blocks (Parquet shards + manifest) for "
                        "`aios-ray train --data`; a re-run on the same inputs does nothing",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    prepare.add_argument("--dataset-file", required=True, help=".txt, .jsonl ('text' field), .parquet ('text' "
                         "column) or a folder of them")
    prepare.add_argument("--out", required=True, help="the prepared directory (on storage every node sees)")
    prepare.add_argument("--tokenizer", help="tokenizer.json or a directory holding one; default: train a "
                         "byte-level BPE on a bounded sample")
    prepare.add_argument("--tokenizer-vocab-size", type=int, default=4096, help="vocabulary of the BPE trained here")
    prepare.add_argument("--tokenizer-sample-mb", type=float, default=64.0,
                         help="the BPE trained here sees at most this much text (MiB), spread over the corpus")
    prepare.add_argument("--max-seq-len", type=int, default=128, help="tokens per training sequence: blocks hold "
                         "max_seq_len + 1 tokens (train with the same --max-seq-len)")
    prepare.add_argument("--dataset-chunk-size", type=int, default=256, help="blocks (training sequences) per "
                         "Parquet shard: the chunk a worker streams at a time")
    prepare.add_argument("--eval-fraction", type=float, default=0.01,
                         help="held-out blocks: the last fraction of every piece")
    prepare.add_argument("--piece-mb", type=float, default=16.0,
                         help="text per Ray Data task (MiB), cut at document boundaries")
    prepare.add_argument("--concurrency", type=int, help="tokenizer actors (default: the cluster's CPUs)")
    prepare.add_argument("--address", help="Ray cluster address (default: a local embedded Ray)")
    prepare.add_argument("--ray", dest="use_ray", action=argparse.BooleanOptionalAction, default=True,
                         help="tokenize on Ray Data (--no-ray: the same steps in this process)")
    prepare.add_argument("--verbose", action="store_true", help="also Ray Data's own log lines (executions, progress)")
    prepare.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from aios_ray.data.prepare_shards import PrepareSpec, prepare_dataset

    fields: dict[str, Any] = {
        "dataset": args.dataset_file, "out": args.out, "max_seq_len": args.max_seq_len,
        "chunk_blocks": args.dataset_chunk_size, "tokenizer": args.tokenizer, "vocab_size": args.tokenizer_vocab_size,
        "tokenizer_sample_mb": args.tokenizer_sample_mb, "eval_fraction": args.eval_fraction,
        "piece_mb": args.piece_mb, "use_ray": args.use_ray, "address": args.address, "concurrency": args.concurrency,
        "verbose": args.verbose}
    summary = prepare_dataset(PrepareSpec(**fields))
    state = "unchanged (same inputs)" if summary["skipped"] else f"written in {summary['seconds']:.1f} s"
    print(f"prepared:     {summary['out']} ({state})")
    print(f"blocks:       {summary['train_blocks']:,} train + {summary['eval_blocks']:,} eval in "
          f"{summary['shards']:,} shards ({summary['tokens']:,} tokens)")
    return 0
