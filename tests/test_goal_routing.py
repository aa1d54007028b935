"""Goal-aware routing: the router bias moves tokens towards the goal's expert; goals resolve to that bias."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import debug_config, events

from aios_ray.config import ModelConfig
from aios_ray.durable import atomic_write_json
from aios_ray.errors import GoalsError
from aios_ray.experts.goals import GoalsDB
from aios_ray.experts.registry import ExpertRegistry
from aios_ray.model.hrm import HRMACTv1
from aios_ray.train.bundle import Bundle
from aios_ray.train.goal_routing import for_active_goals, for_named_goals
from aios_ray.train.run import run_training

CFG = ModelConfig(vocab_size=64, max_seq_len=16, hidden_size=32, num_heads=2, h_layers=1, l_layers=1, h_cycles=1,
                  l_cycles=1, halt_max_steps=1, num_experts=6, num_experts_per_tok=2)


def routed_share(model: HRMACTv1, ids: torch.Tensor, expert: int) -> float:
    """Share of all (token, expert) assignments of every MoE layer that went to ``expert`` (eval mode)."""
    model.eval()
    with torch.no_grad():
        out = model(ids, ids)
    counts = sum(usage.token_counts for usage in out.routing.usage.values())
    return float(counts[expert]) / float(counts.sum())


def test_goal_bias_moves_routing_towards_the_linked_expert_by_a_measured_margin():
    torch.manual_seed(0)
    model = HRMACTv1(CFG)
    ids = torch.randint(0, CFG.vocab_size, (8, CFG.max_seq_len))
    # the least-used expert without bias: the bias has the most to show there
    shares = [routed_share(model, ids, e) for e in range(CFG.num_experts)]
    target = min(range(CFG.num_experts), key=shares.__getitem__)
    bias = torch.zeros(CFG.num_experts)
    bias[target] = 2.0
    model.set_expert_bias(bias)
    biased = routed_share(model, ids, target)
    print(f"expert {target}: {shares[target]:.3f} of the routed assignments without the goal bias, "
          f"{biased:.3f} with +2.0 (top-2 of 6: 0.5 is every token)")
    assert biased - shares[target] >= 0.25
    # the bias is logged with the usage, and off again with None
    with torch.no_grad():
        event = model(ids, ids).routing.events()[0]
    assert event["expert_bias"][target] == 2.0
    model.set_expert_bias(None)
    assert routed_share(model, ids, target) == pytest.approx(shares[target])
    assert "expert_bias" not in model(ids, ids).routing.events()[0]


def test_bias_per_layer_and_shape_checks():
    model = HRMACTv1(CFG)
    per_layer = torch.zeros(2, CFG.num_experts)
    per_layer[1, 3] = 1.0
    model.set_expert_bias(per_layer)
    assert [m.expert_bias[3].item() for m in model.moe_layers()] == [0.0, 1.0]
    with pytest.raises(ValueError):
        model.set_expert_bias(torch.zeros(CFG.num_experts + 1))
    with pytest.raises(ValueError):
        model.set_expert_bias(torch.zeros(3, CFG.num_experts))


def test_active_goals_resolve_to_the_experts_this_brain_holds(tmp_path: Path):
    registry = ExpertRegistry(tmp_path / "experts" / "registry.json")
    for expert_id in ("law", "poems", "elsewhere"):
        registry.add(expert_id)
    db = GoalsDB(tmp_path / "aios.db", registry)
    law = db.add("cite the statute", expert_id="law")
    db.add("rhyme", expert_id="poems")
    db.deactivate(db.add("old goal", expert_id="elsewhere").goal_id)
    db.add("other brain", expert_id="elsewhere")
    attached = {"law": 6, "poems": 7}

    assert for_active_goals(0.0, str(db.path), attached, 8) is None  # strength 0: off, the DB is not read
    bias = for_active_goals(1.5, str(db.path), attached, 8)
    assert bias.experts == {"law": 6, "poems": 7} and bias.not_in_brain == ["elsewhere"]
    assert bias.vector().tolist() == [0.0] * 6 + [1.5, 1.5]
    assert for_active_goals(1.0, str(tmp_path / "none.db"), {}, 8, also={"x": 2}).experts == {"x": 2}

    named = for_named_goals(["cite the statute"], 2.0, str(db.path), attached, 8)
    assert named.experts == {"law": 6} and named.goals == [law.goal_id]
    assert for_named_goals([str(law.goal_id)], 2.0, str(db.path), attached, 8).experts == {"law": 6}
    with pytest.raises(GoalsError, match="unknown goal"):
        for_named_goals(["no such goal"], 2.0, str(db.path), attached, 8)
    with pytest.raises(GoalsError, match="links no expert of this brain"):
        for_named_goals(["other brain"], 2.0, str(db.path), attached, 8)


def test_an_ordinary_run_biases_towards_the_active_goals_experts_it_holds(tmp_path: Path):
    """A brain that holds registry expert 'law' at index 1 (as ``experts attach`` records it) trains on with the
    bias of the DB's active goals: the goal_bias event at the start and expert_bias in every expert_usage event."""
    registry = ExpertRegistry(tmp_path / "experts" / "registry.json")
    registry.add("law")
    registry.add("far")
    db = GoalsDB(tmp_path / "aios.db", registry)
    db.add("cite the statute", expert_id="law")
    db.add("not in this brain", expert_id="far")
    sample = Path(__file__).resolve().parents[1] / "aios_ray" / "data" / "sample" / "train.txt"
    (tmp_path / "data.txt").write_text(sample.read_text(encoding="utf-8")[:30_000])
    common = {"dataset_file": str(tmp_path / "data.txt"), "steps": 3, "eval_batches": 0}
    plan, _ = run_training(debug_config(tmp_path, **common))
    bundle = Bundle(Path(plan.bundle_root))
    atomic_write_json(bundle.root / "metadata.json", {**bundle.metadata(), "attached_experts": {"law": 1}})

    resumed = debug_config(tmp_path, model=None, **common, goal_bias_strength=1.5, goals_db=str(db.path),
                           registry=str(registry.path))
    resumed.train.model = str(bundle.root)
    run_training(resumed)
    (event,) = events(plan.log_file, "goal_bias")
    assert event["experts"] == {"law": 1} and event["not_in_brain"] == ["far"] and event["strength"] == 1.5
    assert event["bias"] == [0.0, 1.5, 0.0, 0.0]
    usage = [e for e in events(plan.log_file, "expert_usage") if e["step"] > 3]
    assert usage and all(e["expert_bias"] == [0.0, 1.5, 0.0, 0.0] for e in usage)
