"""Loading brains through Hugging Face ``transformers`` (the only package that imports it).

```python
import aios_ray.hf
aios_ray.hf.register()                       # AutoConfig / AutoModelForCausalLM know "aios_hrm_actv1"
aios_ray.hf.export_hf("artifacts/brains/actv1/my-brain", "hf/my-brain")   # or: aios-ray export-hf
model = AutoModelForCausalLM.from_pretrained("hf/my-brain")
tokenizer = AutoTokenizer.from_pretrained("hf/my-brain")
```
"""

from __future__ import annotations

import shutil
from pathlib import Path

from aios_ray.errors import UserError
from aios_ray.hf.modeling import MODEL_TYPE, AiosHRMConfig, AiosHRMForCausalLM

__all__ = ["MODEL_TYPE", "AiosHRMConfig", "AiosHRMForCausalLM", "export_hf", "register"]


def register() -> None:
    """Make ``AutoConfig`` and ``AutoModelForCausalLM`` build the HRM classes for ``model_type`` aios_hrm_actv1.
    Safe to call more than once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(MODEL_TYPE, AiosHRMConfig, exist_ok=True)
    AutoModelForCausalLM.register(AiosHRMConfig, AiosHRMForCausalLM, exist_ok=True)


def export_hf(bundle: str | Path, out_dir: str | Path) -> Path:
    """Write a ``transformers`` model directory for a brain bundle: config.json (model_type aios_hrm_actv1),
    model.safetensors (the wrapper's names: ``hrm.`` + the bundle's), the generation defaults and the tokenizer
    (tokenizer.json + tokenizer_config.json, so ``AutoTokenizer`` loads it too)."""
    from transformers import PreTrainedTokenizerFast

    from aios_ray.data.tokenizer import eos_id
    from aios_ray.generate import load_brain

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    hrm, tokenizer, cfg = load_brain(bundle)
    eos = eos_id(tokenizer)
    config = AiosHRMConfig.from_model_config(cfg, eos_token_id=eos)
    model = AiosHRMForCausalLM(config)
    model.hrm.load_state_dict(hrm.state_dict())
    # eos_token_id: generate() stops there, as `aios-ray generate` does
    model.generation_config.eos_token_id = eos
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    shutil.copyfile(Path(bundle) / "tokenizer.json", out / "tokenizer.json")
    eos_token = tokenizer.id_to_token(eos) if eos is not None else None
    PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), eos_token=eos_token).save_pretrained(out)
    return out
