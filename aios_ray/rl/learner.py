"""PPO learner for the MoE agent: RLlib's torch PPO loss plus the MoE balance loss.

``MoEAgentModule._forward_train`` returns the Switch balance loss summed over its MoE layers under
``LB_LOSS_KEY`` (from the same forward pass the PPO terms use); this learner adds ``lb_coef`` times it,
``lb_coef`` being the module's ``model_config["lb_coef"]``. Without the term the router would be trained
by the policy and value gradients alone and could collapse onto one or two experts of a group.

Use: ``PPOConfig().training(learner_class=MoEPPOLearner)``.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.utils.typing import ModuleID

from aios_ray.rl.module import LB_LOSS_KEY

LB_METRIC = "moe_lb_loss"  # learner results, per module: the balance loss before the coefficient


class MoEPPOLearner(PPOTorchLearner):
    def compute_loss_for_module(self, *, module_id: ModuleID, config: Any, batch: dict[str, Any],
                                fwd_out: dict[str, Any]) -> torch.Tensor:
        total = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        lb_loss = fwd_out.get(LB_LOSS_KEY)
        if lb_loss is None:  # a module without MoE layers (or not ours): plain PPO
            return total
        module = self.module[module_id].unwrapped()
        coef = float(module.agent_config.lb_coef) if hasattr(module, "agent_config") else 0.0
        self.metrics.log_value((module_id, LB_METRIC), lb_loss.detach(), window=1)
        return total + coef * lb_loss
