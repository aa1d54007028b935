"""Text generation from a brain bundle: ``aios-ray generate`` and its Python API.

```python
from aios_ray.generate import load_brain, generate_text
model, tokenizer, cfg = load_brain("artifacts/brains/actv1/my-brain")
for piece in generate_text(model, tokenizer, "Once upon a time", max_new_tokens=40, temperature=0):
    print(piece, end="", flush=True)
```

Every step runs the model on the whole context (all ACT segments, as evaluation does; HRM has no KV cache). A
context longer than the model's ``max_seq_len`` is cut to its last ``max_seq_len`` tokens. Generation stops after
``max_new_tokens`` or at the tokenizer's end-of-text token (which is not yielded).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

from aios_ray.config import ModelConfig
from aios_ray.data.tokenizer import eos_id, load_tokenizer
from aios_ray.errors import ConfigError
from aios_ray.model.hrm import HRMACTv1
from aios_ray.train.bundle import Bundle
from aios_ray.train.evaluate import load_bundle_model
from aios_ray.train.goal_routing import ATTACHED_EXPERTS, DEFAULT_GENERATE_STRENGTH, GoalBias, for_named_goals

_REPLACEMENT = "\ufffd"  # what decoding gives for the bytes of a character that is not complete yet


def load_brain(bundle: str | Path) -> tuple[HRMACTv1, Tokenizer, ModelConfig]:
    """The bundle's model (eval mode, CPU), tokenizer and config; BundleError/DataError name what is wrong."""
    root = Path(bundle)
    model = load_bundle_model(root)
    tokenizer = load_tokenizer(str(root), "--model")
    if tokenizer.get_vocab_size() > model.cfg.vocab_size:
        raise ConfigError(f"--model {root}: tokenizer has {tokenizer.get_vocab_size()} tokens, the model "
                          f"{model.cfg.vocab_size}")
    model.attached_experts = Bundle(root).metadata().get(ATTACHED_EXPERTS, {})  # for --goal (apply_goals)
    return model.eval(), tokenizer, model.cfg


def apply_goals(model: HRMACTv1, goals: Sequence[str], db: str | None = None,
                strength: float = DEFAULT_GENERATE_STRENGTH) -> GoalBias | None:
    """Steer routing towards the experts of ``goals`` (goal ids or exact texts of the goals DB ``db``): their
    router logits get ``strength`` added in every MoE layer. No goals: no bias. The brain's registry experts come
    from its metadata (``load_brain`` sets ``model.attached_experts``); an unknown goal, or one that links none of
    them, is a GoalsError (one line, exit 2)."""
    if not goals:
        model.set_expert_bias(None)
        return None
    if not model.cfg.use_moe:
        raise ConfigError("--goal steers MoE routing: this brain has no MoE layers")
    bias = for_named_goals(list(goals), strength, db, getattr(model, "attached_experts", {}), model.cfg.num_experts)
    model.set_expert_bias(bias.vector())
    return bias


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0 or math.isinf(temperature):  # NaN fails ">= 0" too
        raise ConfigError(f"--temperature must be >= 0 and finite (0 is greedy), got {temperature}")
    if top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0 keeps every token), got {top_k}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> int:
    """One token from the last position's logits (V,): argmax when ``temperature`` is 0, else a sample from the
    tempered distribution cut to the ``top_k`` most likely tokens, then to the smallest set whose probability
    reaches ``top_p`` (the most likely token always stays)."""
    logits = logits.float()
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # the mass before a token already reaches top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def generate_tokens(model: HRMACTv1, ids: Sequence[int], *, max_new_tokens: int = 64, temperature: float = 0.8,
                    top_k: int = 50, top_p: float = 0.95, seed: int = 0, eos: int | None = None,
                    goals: Sequence[str] = (), goals_db: str | None = None,
                    goal_bias_strength: float = DEFAULT_GENERATE_STRENGTH) -> Iterator[int]:
    """Yield each new token as soon as it is chosen. ``temperature`` 0 is greedy; ``seed`` makes sampling
    reproducible. The context the model sees is the last ``max_seq_len`` tokens of prompt + generated ones.
    Stops before ``eos`` (not yielded). Bad settings raise here, before the first token."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if not ids:
        raise ConfigError("the prompt is empty: give at least one token")
    apply_goals(model, goals, goals_db, goal_bias_strength)
    model.eval()  # capacity never drops a token in eval; every ACT segment runs
    return _token_stream(model, list(ids), max_new_tokens, temperature, top_k, top_p, seed, eos)


@torch.no_grad()
def _token_stream(model: HRMACTv1, context: list[int], max_new_tokens: int, temperature: float, top_k: int,
                  top_p: float, seed: int, eos: int | None) -> Iterator[int]:
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    window = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        inputs = torch.tensor([context[-window:]], dtype=torch.long, device=device)
        token = next_token(model.inference_logits(inputs)[0, -1], temperature, top_k, top_p, generator)
        if token == eos:
            return
        context.append(token)
        yield token


def decode_stream(tokenizer: Tokenizer, tokens: Iterator[int]) -> Iterator[str]:
    """Text pieces whose concatenation is ``tokenizer.decode(all tokens)``. Byte-level BPE splits a character's
    bytes over several tokens; a piece is held back while the decoded tail is an incomplete character."""
    ids: list[int] = []
    emitted = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith(_REPLACEMENT) or not text.startswith(emitted):
            continue  # wait for the token that completes the character
        if len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text
    text = tokenizer.decode(ids)
    if len(text) > len(emitted) and text.startswith(emitted):  # what was held back (never completed: U+FFFD)
        yield text[len(emitted):]


def generate_text(model: HRMACTv1, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int = 64,
                  temperature: float = 0.8, top_k: int = 50, top_p: float = 0.95, seed: int = 0,
                  goals: Sequence[str] = (), goals_db: str | None = None,
                  goal_bias_strength: float = DEFAULT_GENERATE_STRENGTH) -> Iterator[str]:
    """The prompt's continuation, piece by piece as it is generated (see ``generate_tokens``)."""
    if not prompt:
        raise ConfigError("--prompt is empty")
    ids = tokenizer.encode(prompt).ids
    tokens = generate_tokens(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed, eos=eos_id(tokenizer), goals=goals, goals_db=goals_db,
                             goal_bias_strength=goal_bias_strength)
    return decode_stream(tokenizer, tokens)
