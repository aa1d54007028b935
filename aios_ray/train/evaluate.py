"""Evaluation: the loss the trainer reports, and ``aios-ray eval`` (a bundle's next-token loss and perplexity on
a text file)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from aios_ray.data.dataset import eval_batches, tokenize_documents
from aios_ray.data.text import read_documents
from aios_ray.data.tokenizer import eos_id, load_tokenizer
from aios_ray.errors import BundleError, ConfigError
from aios_ray.model.hrm import HRMACTv1
from aios_ray.train.bundle import MODEL_FILE, is_bundle, load_model_weights, read_model_config


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                  amp: bool) -> float:
    """Mean next-token loss over ``batches``, in eval mode (every ACT segment runs, no token is dropped)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for ids, labels in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(ids.to(device), labels.to(device))
        total += float(out.lm_loss) * len(ids)
        count += len(ids)
    model.train(was_training)
    return total / count


def load_bundle_model(root: Path) -> HRMACTv1:
    if not root.is_dir() or not is_bundle(root):
        raise BundleError(f"--model {root}: not a brain bundle (config.json and metadata.json expected)")
    model = HRMACTv1(read_model_config(root))
    load_model_weights(model, root / MODEL_FILE)
    return model


def evaluate_bundle(root: Path, eval_file: str, max_batches: int, batch_size: int, ascii_only: bool,
                    amp: bool) -> tuple[float, float, int]:
    if max_batches <= 0 or batch_size <= 0:
        raise ConfigError("--eval-batches and --batch-size must be > 0")
    model = load_bundle_model(root)
    tokenizer = load_tokenizer(str(root), "--model")
    docs = read_documents(eval_file, "--eval-file", ascii_only)
    tokens = tokenize_documents(tokenizer, docs, eos_id(tokenizer))
    batches = eval_batches(tokens, model.cfg.max_seq_len, batch_size, max_batches)
    loss = evaluate_loss(model, batches, torch.device("cpu"), amp)
    return loss, math.exp(min(loss, 50.0)), len(batches)
