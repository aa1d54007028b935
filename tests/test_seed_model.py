"""The seed's model flags: --window-size (against a hand-written masked reference), --use-flash-attn (equal to the
default path where there is no flash kernel), --pos-encodings rope|learned|none and --model-dtype bf16 (each
trains and its bundle round-trips), and the optimizer's fp32 master weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from aios_ray.config import ModelConfig, TrainConfig
from aios_ray.model import layers
from aios_ray.model.hrm import HRMACTv1
from aios_ray.model.layers import CausalSelfAttention, RotaryEmbedding, apply_rope
from aios_ray.train.bundle import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    Bundle,
    load_model_weights,
    load_tensors,
    read_model_config,
)
from aios_ray.train.optim import build_optimizer, optimizer_from_tensors, optimizer_to_tensors
from aios_ray.train.run import run_training
from tests.helpers import debug_config, events


def masked_reference(attn: CausalSelfAttention, x: torch.Tensor, window: int,
                     rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Attention written out: scores, -inf where key j is in the future or window or more tokens back, softmax."""
    B, T, C = x.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(x).view(B, T, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // heads)  # (B, nh, T, T)
    for i in range(T):
        for j in range(T):
            if j > i or i - j >= window:
                scores[..., i, j] = float("-inf")
    y = scores.softmax(dim=-1) @ v
    return attn.proj(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("window", [1, 3, 5])
@pytest.mark.parametrize("with_rope", [True, False])
def test_sliding_window_attention_equals_the_masked_reference(window: int, with_rope: bool):
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 2, window_size=window)
    x = torch.randn(2, 9, 16)
    rope = RotaryEmbedding(8, 9, 10000.0)(9) if with_rope else None
    torch.testing.assert_close(attn(x, rope), masked_reference(attn, x, window, rope), atol=1e-5, rtol=1e-5)


def test_a_window_as_long_as_the_sequence_is_full_causal_attention():
    torch.manual_seed(0)
    full = CausalSelfAttention(16, 2)
    x = torch.randn(2, 9, 16)
    expected = full(x, None)
    torch.testing.assert_close(_with_window(full, 9)(x, None), expected)
    torch.testing.assert_close(_with_window(full, 50)(x, None), expected)
    torch.testing.assert_close(masked_reference(full, x, 9, None), expected, atol=1e-5, rtol=1e-5)
    # and a shorter window does change the result
    assert not torch.allclose(_with_window(full, 2)(x, None), expected)


def _with_window(attn: CausalSelfAttention, window: int) -> CausalSelfAttention:
    other = CausalSelfAttention(16, 2, window)
    other.load_state_dict(attn.state_dict())
    return other


def test_use_flash_attn_without_a_flash_kernel_equals_the_default_path_and_says_so_once(capsys, monkeypatch):
    monkeypatch.setattr(layers, "_flash_notice_given", False)
    cfg = ModelConfig(vocab_size=40, max_seq_len=8, hidden_size=16, num_heads=2, h_layers=1, l_layers=1)
    torch.manual_seed(0)
    plain = HRMACTv1(cfg).eval()
    flash = HRMACTv1(ModelConfig(**{**cfg.__dict__, "use_flash_attn": True})).eval()
    flash.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 40, (2, 8))
    assert torch.equal(flash.inference_logits(ids), plain.inference_logits(ids))
    flash.inference_logits(ids)
    notices = [line for line in capsys.readouterr().err.splitlines() if "--use-flash-attn" in line]
    assert len(notices) == 1 and "SDPA's default" in notices[0]


def _tiny_run(tmp_path: Path, name: str, architecture: dict, resume: Path | None = None, **train) -> Path:
    """A 2-step local run on a small generated text (continuing the bundle ``resume``); returns the bundle root."""
    text = " ".join(f"The quick brown fox {i} jumps over the lazy dog number {i * 7}." for i in range(400))
    corpus = tmp_path / "train.txt"
    if not corpus.exists():
        corpus.write_text(text)
        (tmp_path / "eval.txt").write_text(text[:3000])
    options = {"steps": 2, "eval_interval": 2, "checkpoint_interval": 2, "dataset_file": str(corpus),
               "eval_file": str(tmp_path / "eval.txt"), "tokenizer_vocab_size": 300, "eval_batches": 1, **train}
    cfg = debug_config(tmp_path / name, model=architecture, **options)
    cfg.train.model = str(resume) if resume else None
    plan, summary = run_training(cfg)
    assert math.isfinite(summary["eval_loss"])
    return Path(plan.bundle_root)


def _round_trip(root: Path) -> HRMACTv1:
    """Load a bundle as evaluation does; its weights are the saved ones, bit for bit, in the saved dtype."""
    model = HRMACTv1(read_model_config(root))
    load_model_weights(model, root / MODEL_FILE)
    saved = load_tensors(root / MODEL_FILE)
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == saved[name].dtype and torch.equal(tensor, saved[name]), name
    return model


@pytest.mark.parametrize("pos", ["rope", "learned", "none"])
def test_each_pos_encoding_trains_and_its_bundle_round_trips(tmp_path: Path, pos: str):
    root = _tiny_run(tmp_path, pos, {"pos_encodings": pos})
    assert json.loads((root / "config.json").read_text())["pos_encodings"] == pos
    model = _round_trip(root)
    assert ("pos_embed.weight" in model.state_dict()) == (pos == "learned")
    losses = [e["train_loss"] for e in events(root / "metrics.jsonl", "train")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert torch.isfinite(model.eval().inference_logits(torch.tensor([[1, 2, 3, 4]]))).all()


def test_bundles_from_before_pos_encodings_load_as_rope(tmp_path: Path):
    cfg = ModelConfig(vocab_size=40)
    fields = {k: v for k, v in cfg.__dict__.items()
              if k not in ("pos_encodings", "window_size", "use_flash_attn", "model_dtype")}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    loaded = read_model_config(tmp_path)
    assert (loaded.pos_encodings, loaded.window_size, loaded.model_dtype) == ("rope", 0, "fp32")


def test_bf16_trains_saves_bf16_and_resumes_on_fp32_master_weights(tmp_path: Path):
    root = _tiny_run(tmp_path, "bf16", {"model_dtype": "bf16"})
    assert {t.dtype for t in load_tensors(root / MODEL_FILE).values() if t.is_floating_point()} == {torch.bfloat16}
    checkpoint = Bundle(root).latest_checkpoint()
    state = load_tensors(checkpoint / OPTIMIZER_FILE)
    masters = [t for name, t in state.items() if name.endswith(".master")]
    assert masters and all(t.dtype == torch.float32 for t in masters)
    _round_trip(root)
    resumed = _tiny_run(tmp_path, "bf16", {"model_dtype": "bf16"}, resume=root)
    assert [e["step"] for e in events(resumed / "metrics.jsonl", "train")][-1] == 4


def test_master_weights_and_moments_stay_fp32_through_a_state_dict_round_trip():
    cfg = ModelConfig(vocab_size=40, max_seq_len=8, hidden_size=16, num_heads=2, h_layers=1, l_layers=1,
                      model_dtype="bf16")
    torch.manual_seed(0)
    model = HRMACTv1(cfg).train()
    optimizer = build_optimizer(model, TrainConfig())
    ids = torch.randint(0, 40, (2, 8))
    model(ids, ids).loss.backward()
    optimizer.step()
    tensors, groups = optimizer_to_tensors(optimizer)
    again = build_optimizer(model, TrainConfig())
    optimizer_from_tensors(again, tensors, groups)
    for param in model.parameters():
        if param in optimizer.state:
            for key in ("master", "exp_avg", "exp_avg_sq"):
                assert again.state[param][key].dtype == torch.float32
                assert torch.equal(again.state[param][key], optimizer.state[param][key]), key
            # the bf16 weight is the master weight rounded
            assert torch.equal(param, optimizer.state[param]["master"].to(torch.bfloat16))


def test_8bit_optimizer_flag_trains_and_resumes_with_the_bitsandbytes_optimizer(tmp_path: Path, monkeypatch):
    """The wiring, with torch's AdamW standing in for bitsandbytes' AdamW8bit (bitsandbytes is not a dependency)."""
    import importlib.machinery
    import sys
    import types

    built = []

    class StandIn(torch.optim.AdamW):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    fake = types.ModuleType("bitsandbytes")
    fake.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)
    fake.optim = types.SimpleNamespace(AdamW8bit=StandIn)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    root = _tiny_run(tmp_path, "8bit", {}, use_8bit_optimizer=True)
    assert len(built) == 1 and {g["name"] for g in built[0].param_groups} >= {"decay", "experts"}
    resumed = _tiny_run(tmp_path, "8bit", {}, resume=root, use_8bit_optimizer=True)
    assert len(built) == 2 and built[1].state  # the checkpoint's moments were restored into the new optimizer
    assert [e["step"] for e in events(resumed / "metrics.jsonl", "train")][-1] == 4
