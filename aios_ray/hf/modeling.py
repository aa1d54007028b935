"""Hugging Face ``transformers`` glue for HRM ACTv1: a ``PretrainedConfig`` and a ``PreTrainedModel`` with
``GenerationMixin``, so that ``AutoModelForCausalLM.from_pretrained(...).generate(...)`` works on a brain.

The wrapper holds an unchanged :class:`HRMACTv1` under ``hrm``; its forward runs every ACT segment, as evaluation
and ``aios-ray generate`` do, and returns the last segment's logits for the whole sequence. There is no KV cache:
the recurrent H/L states of every position change at every cycle, so each step recomputes the whole context
(at most ``max_seq_len`` tokens; ``generate()`` keeps the last ``max_seq_len`` as ``aios-ray generate`` does).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from aios_ray.config import BUNDLE_MODEL_TYPE, ModelConfig
from aios_ray.model.hrm import HRMACTv1
from aios_ray.model.layers import RotaryEmbedding

MODEL_TYPE = BUNDLE_MODEL_TYPE  # a bundle's config.json names it: the bundle loads with AutoModelForCausalLM
_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class AiosHRMConfig(PretrainedConfig):
    """Every ``ModelConfig`` field, as a ``transformers`` config (``model_type`` ``aios_hrm_actv1``)."""

    model_type = MODEL_TYPE

    def __init__(self, **kwargs: Any) -> None:
        defaults = ModelConfig()
        for name in _FIELDS:
            setattr(self, name, kwargs.pop(name, getattr(defaults, name)))
        kwargs.setdefault("use_cache", False)  # no KV cache: see the module docstring
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs: Any) -> AiosHRMConfig:
        return cls(**dataclasses.asdict(cfg), **kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(**{name: getattr(self, name) for name in _FIELDS})


class AiosHRMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = AiosHRMConfig
    base_model_prefix = "hrm"
    main_input_name = "input_ids"

    def __init__(self, config: AiosHRMConfig) -> None:
        super().__init__(config)
        self.hrm = HRMACTv1(config.to_model_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights come from the checkpoint (HRMACTv1 initialises itself when built directly). ``from_pretrained``
        builds the model on the meta device, so the RoPE tables, which are computed rather than saved, are filled
        in here again."""
        if isinstance(module, RotaryEmbedding):
            cfg = self.config
            fresh = RotaryEmbedding(cfg.hidden_size // cfg.num_heads, cfg.max_seq_len, cfg.rope_theta)
            with torch.no_grad():
                module.cos.copy_(fresh.cos)
                module.sin.copy_(fresh.sin)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # nothing to cache: every step recomputes the context

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.hrm.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.hrm.lm_head

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **_: Any) -> CausalLMOutputWithPast:
        """Logits (B, T, V) of the last ACT segment for every position; ``labels`` as in ``transformers`` (the
        same positions as ``input_ids``, shifted here; -100 ignored). HRM has no padding: a mask must be all ones."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("HRM ACTv1 takes no padding: give unpadded sequences (attention_mask all ones)")
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed max_seq_len {self.config.max_seq_len}")
        logits = self.hrm.inference_logits(input_ids)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                                     ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                                      **_: Any) -> dict[str, Any]:
        """The whole context each step (no cache), cut to its last ``max_seq_len`` tokens."""
        window = self.config.max_seq_len
        inputs: dict[str, Any] = {"input_ids": input_ids[:, -window:]}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask[:, -window:]
        return inputs
