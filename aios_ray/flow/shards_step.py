"""The flow's prepare step with ``--train-args "--use-chunked-training"``: after the text step (dedupe, eval split,
tokenizer), the training text is tokenized on Ray Data into Parquet shards inside the step directory
(``aios_ray.data.prepare_shards``), and the train step streams them (``--data``). The held-out text stays text:
the evaluate step reads it as before.

Run from the driver, as the autotune step is: Ray Data spreads its own actors over the cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aios_ray.config import Config

SHARDS = "shards"


def shard_inputs(base: Config) -> dict[str, Any]:
    """What the shards depend on beyond the text step's inputs (part of the prepare step's key)."""
    return {"max_seq_len": base.model.max_seq_len, "dataset_chunk_size": base.cluster.dataset_chunk_size}


def shard_training_text(out: str, text_outputs: dict[str, Any], base: Config) -> dict[str, Any]:
    """The step's training text as shards in ``<out>/shards``, tokenized with the step's tokenizer."""
    from aios_ray.data.prepare_shards import PrepareSpec, prepare_dataset

    step = Path(out)
    spec = PrepareSpec(dataset=str(step / text_outputs["train"]), out=str(step / SHARDS),
                       max_seq_len=base.model.max_seq_len, chunk_blocks=base.cluster.dataset_chunk_size,
                       tokenizer=str(step / text_outputs["tokenizer"]), eval_fraction=0.0,  # eval: the text split
                       verbose=base.cluster.verbose)
    summary = prepare_dataset(spec)
    stats = {**text_outputs["stats"], "shards": summary["shards"], "train_blocks": summary["train_blocks"],
             "tokens": summary["tokens"]}
    return {"data": SHARDS, "stats": stats}
