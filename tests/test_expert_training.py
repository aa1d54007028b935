"""Expert-only training (``train --expert-id``), ``experts attach`` and their refusals, on tiny debug-preset brains."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from helpers import debug_config, events

from aios_ray.cli import main
from aios_ray.experts.goals import GoalsDB
from aios_ray.experts.registry import ExpertRegistry
from aios_ray.model.expert_surgery import changed_base_tensors, moe_prefixes, take_expert
from aios_ray.model.hrm import HRMACTv1
from aios_ray.train.bundle import MODEL_FILE, load_tensors, read_model_config
from aios_ray.train.expert_only import read_expert, write_expert
from aios_ray.train.run import run_training

WORDS = ["alpha", "beta", "gamma", "delta", "sigma", "omega", "kappa", "theta"]


def greek_text(seed: int, paragraphs: int = 60) -> str:
    """The expert's own data: text unlike the base's (the shipped sample corpus)."""
    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(paragraphs))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A base brain trained for a few steps on a small slice of the sample corpus, and the expert's data."""
    root = tmp_path_factory.mktemp("experts")
    sample = Path(__file__).resolve().parents[1] / "aios_ray" / "data" / "sample" / "train.txt"
    (root / "base.txt").write_text(sample.read_text(encoding="utf-8")[:60_000] + "\n\n" + greek_text(9, 5))
    plan, _ = run_training(debug_config(root, dataset_file=str(root / "base.txt"), steps=4, eval_batches=0))
    (root / "greek.txt").write_text(greek_text(0))
    return {"root": root, "base": Path(plan.bundle_root), "data": root / "greek.txt",
            "registry": root / "experts" / "registry.json", "db": root / "aios.db"}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its sha256: "nothing changed" is an equal snapshot."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def train_expert(world: dict[str, Path], expert_id: str, *extra: str) -> int:
    return main(["train", "--config", "debug", "--no-ray", "--model", str(world["base"]), "--dataset-file",
                 str(world["data"]), "--expert-id", expert_id, "--registry", str(world["registry"]), "--db",
                 str(world["db"]), "--steps", "10", "--lr", "1e-2", "--eval-interval", "5", *extra])


def test_expert_only_training_lowers_its_loss_and_keeps_every_base_bit(world, capsys):
    base_files = snapshot(world["base"])
    assert train_expert(world, "greek", "--default-goal", "Greek letters", "--goal-bias-strength", "1.5") == 0
    out = capsys.readouterr().out
    assert "expert:" in out and "linked to goal" in out
    assert snapshot(world["base"]) == base_files  # the base bundle is read, never written

    entry = ExpertRegistry(world["registry"]).get("greek")
    metrics = entry["performance_metrics"]
    print(f"eval loss on the expert's data: base {metrics['eval_loss_base']:.4f}, before "
          f"{metrics['eval_loss_before']:.4f}, after {metrics['eval_loss_after']:.4f}")
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.1
    assert metrics["eval_loss_after"] < metrics["eval_loss_base"] - 0.1
    assert entry["checkpoint_path"] == "greek/expert.safetensors" and entry["goals"]
    assert entry["total_activations"] > 0 and 0 < entry["avg_routing_weight"] < 1

    # The expert brain: every base tensor bit for bit, one expert more per MoE layer.
    brain = world["registry"].parent / "greek" / "brain"
    base_cfg, brain_cfg = read_model_config(world["base"]), read_model_config(brain)
    assert brain_cfg.num_experts == base_cfg.num_experts + 1
    trained, base = load_tensors(brain / MODEL_FILE), load_tensors(world["base"] / MODEL_FILE)
    prefixes = moe_prefixes(HRMACTv1(brain_cfg))
    assert changed_base_tensors(trained, base, prefixes) == []
    expert, meta = read_expert(world["registry"].parent / "greek" / "expert.safetensors")
    for name, tensor in take_expert(trained, prefixes, base_cfg.num_experts).items():
        assert torch.equal(expert[name], tensor)
    assert meta["expert_id"] == "greek" and meta["base_num_experts"] == str(base_cfg.num_experts)

    # The goal: linked in the DB; its bias is logged at the start and in every expert_usage event.
    goals = GoalsDB(world["db"]).list_for_expert("greek")
    assert [g.text for g in goals] == ["Greek letters"]
    log = brain / "metrics.jsonl"
    (bias_event,) = events(log, "goal_bias")
    assert bias_event["strength"] == 1.5 and bias_event["experts"] == {"greek": base_cfg.num_experts}
    usage = events(log, "expert_usage")
    assert usage and all(e["expert_bias"][base_cfg.num_experts] == 1.5 and len(e["token_counts"]) == 5
                         for e in usage)
    assert sum(e["token_counts"][base_cfg.num_experts] for e in usage) > 0  # the new expert got tokens

    # The same id again continues the expert from its file.
    assert train_expert(world, "greek", "--steps", "3") == 0
    again = ExpertRegistry(world["registry"]).get("greek")
    assert again["training_config"]["init"].startswith("continued")
    assert len(again["training_datasets"]) == 2
    assert again["performance_metrics"]["eval_loss_before"] == pytest.approx(metrics["eval_loss_after"], abs=1e-4)


def test_attach_writes_a_new_brain_that_generates(world, capsys):
    from aios_ray.generate import generate_text, load_brain

    if "greek" not in ExpertRegistry(world["registry"]).ids():
        assert train_expert(world, "greek", "--default-goal", "Greek letters") == 0
    out_dir = world["root"] / "attached"
    base_files = snapshot(world["base"])
    assert main(["experts", "attach", "--model", str(world["base"]), "--expert-id", "greek", "--registry",
                 str(world["registry"]), "--out", str(out_dir)]) == 0
    assert "attached greek as expert 4" in capsys.readouterr().out
    assert snapshot(world["base"]) == base_files
    cfg = read_model_config(out_dir)
    weights, base = load_tensors(out_dir / MODEL_FILE), load_tensors(world["base"] / MODEL_FILE)
    prefixes = moe_prefixes(HRMACTv1(cfg))
    assert cfg.num_experts == 5 and changed_base_tensors(weights, base, prefixes) == []
    assert json.loads((out_dir / "metadata.json").read_text())["attached_experts"] == {"greek": 4}

    model, tokenizer, _ = load_brain(out_dir)
    plain = "".join(generate_text(model, tokenizer, "alpha beta", max_new_tokens=8, temperature=0))
    steered = "".join(generate_text(model, tokenizer, "alpha beta", max_new_tokens=8, temperature=0,
                                    goals=["Greek letters"], goals_db=str(world["db"])))
    assert plain and steered
    assert main(["generate", "--model", str(out_dir), "--prompt", "gamma", "--max-new-tokens", "4", "--goal", "1",
                 "--db", str(world["db"])]) == 0

    # On the expert's own text, the goal moves routing towards the attached expert by a measured margin.
    from aios_ray.data.dataset import eval_batches, tokenize_documents
    from aios_ray.generate import apply_goals

    ids = tokenize_documents(tokenizer, [greek_text(5, 10)], None)
    batch, _ = eval_batches(ids, cfg.max_seq_len, 8, 1)[0]

    def share() -> float:
        with torch.no_grad():
            usage = model(batch, batch).routing.usage.values()
        counts = sum(u.token_counts for u in usage)
        return float(counts[4]) / float(counts.sum())

    apply_goals(model, [])
    plain_share = share()
    apply_goals(model, ["Greek letters"], str(world["db"]), 2.0)
    goal_share = share()
    print(f"attached expert's share of the routed assignments on its text: {plain_share:.3f} without the goal, "
          f"{goal_share:.3f} with --goal (bias +2.0)")
    assert goal_share >= plain_share + 0.05


def _wrong_shape_expert(world: dict[str, Path]) -> str:
    """A registry expert whose FFN is twice as wide as the brain's."""
    registry = ExpertRegistry(world["registry"])
    if "wide" not in registry.ids():
        expert, _ = read_expert(world["registry"].parent / "greek" / "expert.safetensors")
        wide = {k: torch.cat([v, v], dim=-1) if k.endswith("w_gate_up") else v for k, v in expert.items()}
        write_expert(world["registry"].parent / "wide" / "expert.safetensors", wide, {"expert_id": "wide"})
        registry.add("wide")
    return "wide"


BAD_INPUTS = {
    "attach an unknown expert": lambda w: ["experts", "attach", "--model", str(w["base"]), "--expert-id", "nope"],
    "attach an expert whose shape does not fit": lambda w: [
        "experts", "attach", "--model", str(w["base"]), "--expert-id", _wrong_shape_expert(w)],
    "continue an expert whose shape does not fit": lambda w: [
        "train", "--config", "debug", "--no-ray", "--model", str(w["base"]), "--dataset-file", str(w["data"]),
        "--expert-id", _wrong_shape_expert(w)],
    "attach to a brain that holds the expert": lambda w: [
        "experts", "attach", "--model", str(w["registry"].parent / "greek" / "brain"), "--expert-id", "greek"],
    "generate with an unknown goal": lambda w: [
        "generate", "--model", str(w["registry"].parent / "greek" / "brain"), "--prompt", "alpha", "--goal", "99",
        "--db", str(w["db"])],
    "generate with a goal whose experts the brain lacks": lambda w: [
        "generate", "--model", str(w["base"]), "--prompt", "alpha", "--goal", "1", "--db", str(w["db"])],
    "an invalid expert id": lambda w: [
        "train", "--config", "debug", "--no-ray", "--model", str(w["base"]), "--dataset-file", str(w["data"]),
        "--expert-id", "../escape"],
    "expert-only training without a base brain": lambda w: [
        "train", "--config", "debug", "--no-ray", "--dataset-file", str(w["data"]), "--expert-id", "x"],
    "resume the expert brain as an ordinary run": lambda w: [
        "train", "--config", "debug", "--no-ray", "--model", str(w["registry"].parent / "greek" / "brain")],
    "an empty default goal": lambda w: [
        "train", "--config", "debug", "--no-ray", "--model", str(w["base"]), "--dataset-file", str(w["data"]),
        "--expert-id", "x", "--default-goal", " "],
}

EXPECTED = {
    "attach an unknown expert": "unknown expert 'nope'",
    "attach an expert whose shape does not fit": "does not fit the brain",
    "continue an expert whose shape does not fit": "does not fit this brain",
    "attach to a brain that holds the expert": "already holds expert 'greek'",
    "generate with an unknown goal": "unknown goal '99'",
    "generate with a goal whose experts the brain lacks": "links no expert of this brain",
    "an invalid expert id": "expert id '../escape'",
    "expert-only training without a base brain": "--expert-id needs --model",
    "resume the expert brain as an ordinary run": "names no checkpoint",
    "an empty default goal": "--default-goal is empty",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, capsys, case):
    if "greek" not in ExpertRegistry(world["registry"]).ids():
        assert train_expert(world, "greek", "--default-goal", "Greek letters") == 0
    argv = BAD_INPUTS[case](world)
    expected = EXPECTED[case]
    needs_registry = argv[0] in ("experts", "train") and "--registry" not in argv
    argv += ["--registry", str(world["registry"])] if needs_registry else []
    argv += ["--db", str(world["db"])] if argv[0] == "train" else []
    capsys.readouterr()
    before = snapshot(world["root"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("aios-ray: error:"), err
    assert expected in err, err
    assert snapshot(world["root"]) == before
