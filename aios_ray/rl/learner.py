"""PPO learner for the MoE agent: RLlib's torch PPO loss plus the MoE balance loss.

``MoEAgentModule._forward_train`` returns the Switch balance loss summed over its MoE layers under
``LB_LOSS_KEY`` (from the same forward pass the PPO terms use); this learner adds ``lb_coef`` times it,
``lb_coef`` being the module's ``model_config["lb_coef"]``. Without the term the router would be trained
by the policy and value gradients alone and could collapse onto one or two experts of a group.

Optimizer: Adam with torch's defaults (what RLlib's ``TorchLearner`` builds), but with each expert stepped
on its own (``ExpertSparseAdamW`` with no weight decay, as the text trainer does): an expert that no
observation chose in a minibatch keeps its weights, moments and step count. Why: with one Adam over the
stacked expert tensors an old game's experts would keep moving on stale momentum after a switch, and a new
game's experts would start with a bias correction worn out by the old game's steps. It is also what the
tiered store can run, so local and tiered experts take the same updates.

Where the experts live: ``aios_ray.rl.tiered`` opens an ``ExpertBackend`` per module when the module is
built (``LocalExperts``, or the tiered store when ``model_config["store"]`` says so). Each minibatch update
(``_update``) is one backend step: ``begin_step`` before the forward pass, ``after_backward`` after
``compute_gradients``, expert gradients clipped together with the module's in
``postprocess_gradients_for_module``, ``backend.step(lr)`` after RLlib's optimizer in ``apply_gradients``,
``end_step`` (or ``abort_step``) after.

Use: ``PPOConfig().learners(learner_class=MoEPPOLearner)``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModule
from ray.rllib.utils.typing import ModuleID, ParamDict

from aios_ray.rl.module import LB_LOSS_KEY
from aios_ray.rl.tiered import close_agent_experts, open_agent_experts
from aios_ray.store.backend import ExpertBackend
from aios_ray.train.optim import ExpertSparseAdamW, is_expert_param, is_router_param

LB_METRIC = "moe_lb_loss"  # learner results, per module: the balance loss before the coefficient
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults: the optimizer RLlib's TorchLearner builds
ADAM_EPS = 1e-8


class MoEPPOLearner(PPOTorchLearner):
    expert_backends: dict[ModuleID, ExpertBackend]

    # --- where the experts live ----------------------------------------------------------------------------

    def _make_module(self) -> MultiRLModule:
        """Built before the optimizers: a tiered module's experts leave its parameters here, so RLlib's
        optimizer (and its parameter bookkeeping) never holds them."""
        module = super()._make_module()
        self.expert_backends = {mid: open_agent_experts(sub.unwrapped(), betas=ADAM_BETAS, eps=ADAM_EPS)
                                for mid, sub in module.items()}
        return module

    def configure_optimizers_for_module(self, module_id: ModuleID, config: Any = None) -> None:
        """Adam (torch's defaults, no weight decay) with per-expert steps for local experts; see the module doc."""
        module = self._module[module_id]
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        # A router's weight is (experts, features): its rows are stepped per expert too, so the rows of
        # experts outside the active group do not move on stale momentum either.
        per_expert = [p for name, p in named if is_expert_param(name) or is_router_param(name)]
        others = [p for name, p in named if not (is_expert_param(name) or is_router_param(name))]
        groups = [{"params": others, "name": "params"},
                  {"params": per_expert, "name": "experts", "per_expert": True}]
        # lr 0 until registration: RLlib's scheduler sets the LR (fixed or scheduled) on every group.
        optimizer = ExpertSparseAdamW([g for g in groups if g["params"]], lr=0.0, betas=ADAM_BETAS, eps=ADAM_EPS)
        self.register_optimizer(module_id=module_id, optimizer=optimizer, params=others + per_expert,
                                lr_or_lr_schedule=config.lr)

    def shutdown(self) -> None:
        for backend in getattr(self, "expert_backends", {}).values():
            close_agent_experts(backend)
        super().shutdown()

    # --- one minibatch update = one expert-backend step ----------------------------------------------------

    def _update(self, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        started = time.perf_counter()
        for backend in self.expert_backends.values():
            backend.begin_step()
        try:
            result = super()._update(batch)
        except BaseException:
            for backend in self.expert_backends.values():
                backend.abort_step()
            raise
        self._expert_steps = getattr(self, "_expert_steps", 0) + 1
        for backend in self.expert_backends.values():
            backend.end_step(self._expert_steps)
        samples, seconds = self.samples_trained()
        self._samples_trained = (samples + _minibatch_rows(batch), seconds + time.perf_counter() - started)
        return result

    def samples_trained(self) -> tuple[int, float]:
        """(samples, seconds) over every minibatch update so far: a sample counts once per epoch that trains on
        it; the seconds are those of the updates themselves (forward, backward, optimizer and store)."""
        return getattr(self, "_samples_trained", (0, 0.0))

    def compute_gradients(self, loss_per_module: dict[ModuleID, Any], **kwargs: Any) -> ParamDict:
        gradients = super().compute_gradients(loss_per_module, **kwargs)
        dropped: set[int] = set()
        for module_id, backend in self.expert_backends.items():
            backend.after_backward()
            module = self.module[module_id].unwrapped()
            if getattr(module, "shared_frozen", False):  # only the active game's own parameters train
                dropped.update(id(p) for p in module.drop_shared_gradients())
                held = module.held_experts()
                backend.drop_expert_gradients({layer: held for layer in range(len(module.moe_layers()))})
        # Dropped gradients leave the dict (RLlib would set them back on the parameters and step them), and so
        # do the missing ones of parameters this pass did not use (the other games' heads).
        return {ref: grad for ref, grad in gradients.items()
                if grad is not None and id(self._params[ref]) not in dropped}

    def postprocess_gradients_for_module(self, *, module_id: ModuleID, config: Any = None,
                                         module_gradients_dict: ParamDict) -> ParamDict:
        """Experts the store holds are clipped together with the module's gradients, as the local module's
        stacked expert tensors are (one optimizer per module: its global norm covers both)."""
        experts = [leaf for leaf in self.expert_backends[module_id].parameters() if leaf.grad is not None]
        if not experts or not config.grad_clip:
            return super().postprocess_gradients_for_module(module_id=module_id, config=config,
                                                            module_gradients_dict=module_gradients_dict)
        if config.grad_clip_by == "norm":
            # Per-tensor norms: a local stacked tensor (E, ...) against per-expert records would clip differently.
            raise ValueError("grad_clip_by='norm' is not supported with tiered experts; use 'global_norm' or 'value'")
        combined: dict[Any, torch.Tensor] = dict(module_gradients_dict)
        combined.update({("expert", index): leaf.grad for index, leaf in enumerate(experts)})
        global_norm = self._get_clip_function()(combined, grad_clip=config.grad_clip,
                                                grad_clip_by=config.grad_clip_by)
        if config.grad_clip_by == "global_norm":
            for name, _ in self.get_optimizers_for_module(module_id):
                self.metrics.log_value(key=(module_id, f"gradients_{name}_global_norm"), value=global_norm,
                                       window=1)
        for index, leaf in enumerate(experts):  # clipping by value builds new tensors
            leaf.grad = combined[("expert", index)]
        return {ref: combined[ref] for ref in module_gradients_dict}

    def apply_gradients(self, gradients_dict: ParamDict) -> None:
        super().apply_gradients(gradients_dict)
        for module_id, backend in self.expert_backends.items():
            optimizer = self.get_optimizers_for_module(module_id)[0][1]
            backend.step(self._get_optimizer_lr(optimizer))  # the LR RLlib's scheduler set for this update

    # --- the loss ------------------------------------------------------------------------------------------

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


def _minibatch_rows(batch: dict[str, Any]) -> int:
    """Rows of one minibatch (the largest module's: every module trains on its own rows)."""
    from ray.rllib.core.columns import Columns

    return max((len(columns[Columns.OBS]) for columns in batch.values() if Columns.OBS in columns), default=0)
