"""The steps of ``aios-ray flow hrm-train`` as plain functions (``hrm_train`` makes them Ray tasks).

Each writes into its own step directory ``out`` and returns what the next steps need (paths relative to
``out``). Inputs are read and validated before ``out`` is created, so bad input leaves nothing behind. A
directory left by an earlier failed attempt is never trusted: each step starts from an empty one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from aios_ray.config import Config
from aios_ray.data.text import read_documents
from aios_ray.data.tokenizer import load_tokenizer, train_bpe
from aios_ray.durable import atomic_write_bytes, atomic_write_json
from aios_ray.errors import DataError
from aios_ray.train.bundle import CHECKPOINTS, read_json

TRAIN_TEXT, EVAL_TEXT, TOKENIZER, STATS = "train.jsonl", "eval.jsonl", "tokenizer.json", "prepare.json"
CARD = "MODEL_CARD.md"
NOT_PACKAGED = {"ray_results", "STOP"}  # Ray Train's copies of the checkpoints; a stop request


# ---- prepare ------------------------------------------------------------------------------------------


def prepare_data(out: str, dataset: str, eval_file: str | None, eval_fraction: float, ascii_only: bool,
                 tokenizer: str | None, vocab_size: int) -> dict[str, Any]:
    """Validate and read the text, drop duplicate documents, hold out an eval set, build the tokenizer."""
    train_docs, duplicates = dedupe(read_documents(dataset, "--dataset-file", ascii_only))
    given = read_documents(eval_file, "--eval-file", ascii_only) if eval_file else None
    tok = load_tokenizer(tokenizer, "--tokenizer") if tokenizer else None
    stats: dict[str, Any] = {"documents_read": len(train_docs) + duplicates, "duplicates_removed": duplicates}
    if given is None:
        train_docs, eval_docs = split_held_out(train_docs, eval_fraction, dataset)
        stats["eval_source"] = f"{eval_fraction:g} of the documents, chosen by content hash"
    else:
        eval_docs, eval_duplicates = dedupe(given)
        eval_docs, overlap = without_overlap(eval_docs, train_docs, eval_file)
        stats.update(eval_source=f"--eval-file {eval_file}", eval_duplicates_removed=eval_duplicates,
                     eval_overlap_removed=overlap)
    tok = tok or train_bpe(train_docs, vocab_size)
    stats.update(train_documents=len(train_docs), eval_documents=len(eval_docs),
                 vocab_size=tok.get_vocab_size(), tokenizer="given" if tokenizer else "byte-level BPE on the split")
    directory = _fresh(out)
    _write_jsonl(directory / TRAIN_TEXT, train_docs)
    _write_jsonl(directory / EVAL_TEXT, eval_docs)
    atomic_write_bytes(directory / TOKENIZER, tok.to_str().encode("utf-8"))
    atomic_write_json(directory / STATS, stats)
    return {"train": TRAIN_TEXT, "eval": EVAL_TEXT, "tokenizer": TOKENIZER, "stats": stats}


def _norm(doc: str) -> str:
    """Documents that differ only in whitespace (re-wrapped paragraphs) count as the same."""
    return " ".join(doc.split())


def dedupe(docs: list[str]) -> tuple[list[str], int]:
    """The documents without repeats (first occurrence kept, order kept) and how many were dropped."""
    seen: set[str] = set()
    kept = []
    for doc in docs:
        key = _norm(doc)
        if key not in seen:
            seen.add(key)
            kept.append(doc)
    return kept, len(docs) - len(kept)


def split_held_out(docs: list[str], fraction: float, source: str) -> tuple[list[str], list[str]]:
    """(train, eval): the eval documents are those whose content hash sorts first, so the split depends on the
    text alone (not on order or a seed) and a document added later does not move the others."""
    if len(docs) < 2:
        raise DataError(f"--dataset-file {source}: {len(docs)} distinct document(s); holding out an eval split "
                        f"needs at least 2 (or give --eval-file)")
    count = min(max(round(fraction * len(docs)), 1), len(docs) - 1)
    ranked = sorted(range(len(docs)), key=lambda i: hashlib.sha256(_norm(docs[i]).encode("utf-8")).digest())
    held = set(ranked[:count])
    return ([d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held])


def without_overlap(eval_docs: list[str], train_docs: list[str], source: str) -> tuple[list[str], int]:
    """Eval documents that are also training documents measure memory, not generalisation: drop them."""
    seen = {_norm(d) for d in train_docs}
    kept = [d for d in eval_docs if _norm(d) not in seen]
    if not kept:
        raise DataError(f"--eval-file {source}: every document is also in --dataset-file")
    return kept, len(eval_docs) - len(kept)


def _write_jsonl(path: Path, docs: list[str]) -> None:
    """JSONL, not .txt: a document holding a blank line stays one document when it is read back."""
    text = "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs)
    atomic_write_bytes(path, text.encode("utf-8"))


# ---- train, evaluate ------------------------------------------------------------------------------------


def train_model(out: str, sections: dict[str, Any]) -> dict[str, Any]:
    """``aios-ray train`` with the flow's config (its bundle placed in ``out``)."""
    from aios_ray.train.run import run_training

    cfg = Config.from_dict(sections, source="flow --train-args")
    _fresh(out, create=False)  # prepare_run refuses an existing bundle; the bundle dir is made by the trainer
    plan, summary = run_training(cfg)
    plain = {k: v for k, v in summary.items() if isinstance(v, int | float | str | bool)}
    return {"bundle": Path(plan.bundle_root).relative_to(Path(out).resolve()).as_posix(), "summary": plain}


def evaluate_model(out: str, bundle: str, eval_file: str, eval_batches: int, batch_size: int, ascii_only: bool,
                   amp: bool) -> dict[str, Any]:
    """``aios-ray eval`` of the bundle on the held-out text."""
    from aios_ray.train.evaluate import evaluate_bundle

    loss, ppl, batches = evaluate_bundle(Path(bundle), eval_file, eval_batches, batch_size, ascii_only, amp)
    metrics = {"eval_loss": loss, "ppl": ppl, "batches": batches, "batch_size": batch_size}
    atomic_write_json(_fresh(out) / "metrics.json", metrics)
    return metrics


# ---- package --------------------------------------------------------------------------------------------


def package_bundle(out: str, bundle: str, brain: str, facts: dict[str, Any]) -> dict[str, Any]:
    """The bundle as a deliverable (its latest checkpoint kept, so it can still be resumed) and its card."""
    source = Path(bundle)
    dest = _fresh(out) / brain
    latest = read_json(source / "metadata.json").get("latest_checkpoint")
    shutil.copytree(source, dest, ignore=lambda d, names: _left_out(Path(d), names, source, latest))
    card = model_card(facts, read_json(dest / "config.json"), read_json(dest / "metadata.json"),
                      read_json(dest / "training_args.json"))
    atomic_write_bytes(dest / CARD, card.encode("utf-8"))
    return {"bundle": brain, "model_card": f"{brain}/{CARD}"}


def _left_out(directory: Path, names: list[str], root: Path, latest: str | None) -> set[str]:
    if directory == root:
        return NOT_PACKAGED & set(names)
    if directory == root / CHECKPOINTS:  # older checkpoints are history, not the model
        return {n for n in names if n != latest}
    return set()


def model_card(facts: dict[str, Any], model: dict[str, Any], metadata: dict[str, Any],
               training_args: dict[str, Any]) -> str:
    """The card: where the data came from (its sha256), what was trained how, and the held-out metrics."""
    data, prep, train, ev = facts["dataset"], facts["prepare"], facts["train"], facts["evaluate"]
    params = metadata.get("parameters", {})
    tokens = (metadata.get("dataset_history") or [{}])[-1].get("tokens")
    tc = training_args.get("train", {})
    rows = [
        "## Data", "", "| | |", "|---|---|",
        f"| dataset | `{data['path']}` |",
        f"| sha256 | `{data['sha256']}` |",
        f"| documents | {prep['documents_read']} read, {prep['duplicates_removed']} duplicates removed |",
        f"| training split | {prep['train_documents']} documents, {_count(tokens)} tokens |",
        f"| held-out split | {prep['eval_documents']} documents: {prep['eval_source']} |",
    ]
    if facts.get("eval_file"):
        rows.append(f"| eval file sha256 | `{facts['eval_file']['sha256']}` |")
    rows += [f"| tokenizer | {prep['tokenizer']}, vocabulary {prep['vocab_size']} |", "",
             "## Model", "", "| | |", "|---|---|",
             f"| architecture | HRM ACTv1, hidden {model['hidden_size']}, {model['num_heads']} heads, "
             f"H {model['h_layers']} x {model['h_cycles']} cycles, L {model['l_layers']} x {model['l_cycles']} "
             f"cycles, context {model['max_seq_len']} tokens |",
             "| feed-forward | " + (f"MoE, {model['num_experts']} experts, top-{model['num_experts_per_tok']}"
                                   if model.get("use_moe") else "dense SwiGLU") + " |",
             f"| parameters | {_count(params.get('total'))} ({_count(params.get('active_per_token'))} active per "
             f"token) |", "",
             "## Training", "", "| | |", "|---|---|",
             f"| steps | {train.get('step')} |",
             f"| hyper-parameters | lr {_fmt(tc.get('lr'))}, warm-up {tc.get('warmup_steps')} steps, batch "
             f"{tc.get('batch_size')} x {tc.get('grad_accum')} accumulation, seed {tc.get('seed')}, MoE balance "
             f"coefficient {_fmt(model.get('moe_lb_coef'))} |",
             f"| final train loss | {_fmt(train.get('train_loss'))} |",
             f"| last eval loss during training | {_fmt(train.get('eval_loss'))} |"]
    tuned = facts.get("autotune")
    if tuned:
        values = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(tuned["best_params"].items()))
        rows.append(f"| autotune best trial | {values} ({tuned['metric']} {_fmt(tuned['best_value'])}) |")
    rows += ["", "## Evaluation (held-out split)", "", "| | |", "|---|---|",
             f"| eval_loss | {ev['eval_loss']:.4f} |", f"| perplexity | {ev['ppl']:.2f} |",
             f"| batches | {ev['batches']} of {ev['batch_size']} sequences |", "",
             "## Provenance", "", "Flow steps (name-hash of their inputs):", "",
             *[f"- `{name}-{key}`" for name, key in facts["steps"].items()], "",
             "Evaluate again: `aios-ray eval --model <this directory> --eval-file <text>`.", ""]
    header = [f"# {facts['brain']}", "",
              f"An HRM ACTv1 language model, packaged by `aios-ray flow hrm-train` on "
              f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}.", ""]
    return "\n".join(header + rows)


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "n/a"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 else f"{value:.4f}"
    return "n/a" if value is None else str(value)


def _fresh(out: str, create: bool = True) -> Path:
    """The step directory, emptied of what an interrupted attempt left."""
    directory = Path(out)
    shutil.rmtree(directory, ignore_errors=True)
    if create:
        directory.mkdir(parents=True)
    return directory
