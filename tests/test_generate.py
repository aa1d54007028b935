"""Generation: ``aios-ray generate`` and its Python API agree; seeded sampling repeats; the ``transformers`` load
path (export-hf, or the bundle itself) generates the same greedy tokens; bad input is one line and exit 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from aios_ray.cli import main
from aios_ray.generate import decode_stream, generate_text, generate_tokens, load_brain
from tests.helpers import run_cli
from tests.test_layering import PACKAGE, imported_modules

PROMPT = "Once upon a time"
# Prompt + new tokens exceed the debug preset's max_seq_len (32): the context window slides in every path.
NEW_TOKENS = 26



@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brains")
    assert main(["train", "--config", "debug", "--no-ray", "--bundle-dir", str(root), "--brain-name", "g"]) == 0
    return root / "g"


@pytest.fixture(scope="module")
def brain(bundle: Path):
    return load_brain(bundle)


def _greedy(brain, prompt: str = PROMPT, n: int = NEW_TOKENS) -> list[int]:
    model, tokenizer, _ = brain
    return list(generate_tokens(model, tokenizer.encode(prompt).ids, max_new_tokens=n, temperature=0))


@pytest.fixture(scope="module")
def greedy(brain) -> list[int]:
    """The Python API's greedy continuation of PROMPT: the reference of every other path."""
    return _greedy(brain)


def test_greedy_is_deterministic_and_the_cli_prints_the_api_text(bundle: Path, brain, greedy: list[int], capsys):
    model, tokenizer, cfg = brain
    tokens = greedy
    assert tokens == _greedy(brain)
    assert len(tokenizer.encode(PROMPT).ids) + len(tokens) > cfg.max_seq_len  # the window slid
    text = "".join(generate_text(model, tokenizer, PROMPT, max_new_tokens=NEW_TOKENS, temperature=0))
    assert text == tokenizer.decode(tokens)
    code, out, err = run_cli(["generate", "--model", str(bundle), "--prompt", PROMPT,
                           "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0"], capsys)
    assert (code, err) == (0, "")
    assert out == text + "\n"


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens(brain):
    model, tokenizer, cfg = brain
    long_prompt = " ".join(["the cat sat on the mat"] * 20)
    assert len(tokenizer.encode(long_prompt).ids) > cfg.max_seq_len
    tail = tokenizer.decode(tokenizer.encode(long_prompt).ids[-cfg.max_seq_len:])
    assert tokenizer.encode(tail).ids == tokenizer.encode(long_prompt).ids[-cfg.max_seq_len:]
    assert _greedy(brain, long_prompt, 5) == _greedy(brain, tail, 5)


def test_seeded_sampling_repeats_and_the_cli_samples_the_same(bundle: Path, brain, greedy: list[int], capsys):
    model, tokenizer, _ = brain
    ids = tokenizer.encode(PROMPT).ids

    def sample(seed: int, **kw) -> list[int]:
        settings = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kw}
        return list(generate_tokens(model, ids, max_new_tokens=20, seed=seed, **settings))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(5, top_k=1) == greedy[:20]  # one candidate left: sampling is greedy
    assert sample(5, top_p=1e-6) == greedy[:20]  # the likeliest token always stays
    expected = "".join(generate_text(model, tokenizer, PROMPT, max_new_tokens=20, temperature=0.7, top_k=40,
                                     top_p=0.9, seed=11))
    code, out, _ = run_cli(["generate", "--model", str(bundle), "--prompt", PROMPT, "--max-new-tokens", "20",
                         "--temperature", "0.7", "--top-k", "40", "--top-p", "0.9", "--seed", "11"], capsys)
    assert code == 0 and out == expected + "\n"


def test_the_stream_holds_back_split_characters(brain):
    _, tokenizer, _ = brain
    ids = tokenizer.encode("caf\u00e9 \u2014 \u2713 \U0001f600 done").ids
    pieces = list(decode_stream(tokenizer, iter(ids)))
    assert "".join(pieces) == tokenizer.decode(ids) == "caf\u00e9 \u2014 \u2713 \U0001f600 done"
    assert not any("\ufffd" in piece for piece in pieces)
    assert len(pieces) > 1  # streamed, not one piece at the end


def test_transformers_generate_equals_aios_ray_generate(bundle: Path, brain, greedy: list[int], tmp_path: Path,
                                                       capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    import aios_ray.hf
    from aios_ray.hf import AiosHRMForCausalLM

    aios_ray.hf.register()
    code, out, _ = run_cli(["export-hf", "--model", str(bundle), "--out", str(tmp_path / "hf")], capsys)
    assert code == 0, out
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert isinstance(hf_model, AiosHRMForCausalLM)
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = PreTrainedTokenizerFast(tokenizer_file=str(bundle / "tokenizer.json"))(PROMPT).input_ids
    assert ids == hf_tokenizer(PROMPT).input_ids == brain[1].encode(PROMPT).ids
    expected = greedy  # what `aios-ray generate --temperature 0` prints (the first test)

    def hf_greedy(model) -> list[int]:
        prompt = torch.tensor([ids])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=NEW_TOKENS)
        return out[0, len(ids):].tolist()

    eos = hf_model.generation_config.eos_token_id
    got = hf_greedy(hf_model)
    assert (got[:-1] if got and got[-1] == eos and len(got) == len(expected) + 1 else got) == expected
    # The bundle directory itself loads too: its config.json names the registered model_type.
    assert hf_greedy(AutoModelForCausalLM.from_pretrained(bundle))[:len(expected)] == expected


def test_bad_input_is_one_line_exit_2(bundle: Path, tmp_path: Path, capsys):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(bundle, corrupt, ignore=shutil.ignore_patterns("checkpoints"))
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    base = ["generate", "--model", str(bundle), "--prompt", PROMPT]
    cases = [
        (["generate", "--model", str(tmp_path / "none"), "--prompt", "x"], "not a brain bundle"),
        (["generate", "--model", str(corrupt), "--prompt", "x"], "corrupt or truncated"),
        (["generate", "--model", str(bundle), "--prompt", ""], "--prompt is empty"),
        ([*base, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        ([*base, "--temperature", "-0.5"], "--temperature must be >= 0"),
        ([*base, "--temperature", "nan"], "--temperature must be >= 0"),
        ([*base, "--top-k", "-1"], "--top-k must be >= 0"),
        ([*base, "--top-p", "0"], "--top-p must be in (0, 1]"),
        ([*base, "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        ([*base, "--max-new-tokens", "many"], "invalid int value"),
        ([*base, "--goal", "arithmetic", "--db", str(tmp_path / "no.db")], "unknown goal 'arithmetic'"),
        (["export-hf", "--model", str(corrupt), "--out", str(tmp_path / "hf")], "corrupt or truncated"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(argv, capsys)
        assert code == 2, argv
        assert message in err and err.count("\n") == 1, (argv, err)
        assert out == "", argv
    assert not (tmp_path / "hf").exists()


def test_generation_imports_neither_ray_nor_transformers():
    for module in imported_modules(PACKAGE / "generate.py"):
        assert not module.startswith(("ray", "transformers")), module
