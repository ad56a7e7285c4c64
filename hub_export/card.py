"""The README.md model card: YAML metadata (huggingface_hub ``ModelCardData``) and a usage snippet."""

from __future__ import annotations

import json
import re

from huggingface_hub import ModelCard, ModelCardData

from .families import NEUTRAL_GENERATION, Family

MODEL_ID_LINE = re.compile(r'^model_id = ".*"$', flags=re.MULTILINE)


def transformers_requirement() -> str:
    """The transformers range this package declares (pyproject.toml), e.g. ``>=5.17,<6``."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        reqs = [Requirement(r) for r in requires("modeling_visualglm") or []]
    except PackageNotFoundError:  # not installed (a source checkout on sys.path): no claim beyond the code's
        return ""
    for req in reqs:
        if req.name == "transformers" and req.marker is None:
            return ",".join(sorted((str(s) for s in req.specifier), key=lambda s: not s.startswith(">")))
    return ""


def describe_defaults(defaults: dict) -> str:
    return ", ".join(f"`{k}={v!r}`" for k, v in defaults.items())


def render_card(family: Family, *, model_id: str, source_note: str, files_note: str, complete: bool,
                config=None) -> str:
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["custom_code", *family.tags],
        base_model=family.base_model,
        license=family.license,
        license_name=family.license_name,
        license_link=family.license_link,
        language=list(family.languages) or None,
    )
    status = "" if complete else (
        "\n> **Incomplete folder:** it has no tokenizer files. Re-run the conversion with `--tokenizer` "
        f"({family.tokenizer_hint}) before using or uploading it.\n"
    )
    model_class = family.model.load()
    skip = json.dumps(list(model_class.quantization_skip_modules))
    defaults = describe_defaults(model_class.chat_defaults_for(config)) if config is not None else "the original's"
    requirement = transformers_requirement()
    versions = f"`transformers{requirement}` or 4.57.x" if requirement else "transformers 4.57.x or 5.x"
    body = f"""
# {family.title} (transformers remote code)

{family.summary}
{status}
## Usage

Needs {versions}, `torch`, `sentencepiece` and `pillow`; the model code ships in this repository, so pass
`trust_remote_code=True`.

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_id = "{model_id}"
tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True, dtype="auto").eval()
if torch.cuda.is_available():
    model = model.cuda()

response, history = model.chat(tokenizer, "image.jpg", "{family.example_query}", history=[])
print(response)
response, history = model.chat(tokenizer, "image.jpg", "What else do you see?", history=history)
```

`chat` uses the original's generation defaults ({defaults}); any `generate()` keyword overrides them, e.g.
`do_sample=False, max_new_tokens=64, min_length=0`. In `chat`, `max_length` counts new tokens only, and the
oldest history turns are left out of the prompt (with a warning) when it outgrows the model's positions.
`stream_chat` yields partial answers. `generation_config.json` is neutral: a plain `generate()` decodes
greedily and stops at EOS or after {NEUTRAL_GENERATION['max_new_tokens']} new tokens. `AutoProcessor` builds batched, left-padded `input_ids` /
`attention_mask` / `pixel_values` for `generate()`.

## Bigger than one GPU, or 4-bit

```python
from transformers import BitsAndBytesConfig

# split over GPUs / offload to CPU memory (accelerate keeps each layer whole)
model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True, dtype=torch.bfloat16,
                                             device_map="auto").eval()
# 4-bit language model, image path kept in bf16 (needs bitsandbytes and a CUDA GPU)
nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                         llm_int8_skip_modules={skip})
model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True, dtype=torch.bfloat16,
                                             quantization_config=nf4, device_map={{"": 0}}).eval()
```

Without `llm_int8_skip_modules` bitsandbytes would quantize the vision tower and adapter too.
`generate(..., cache_implementation="static")` compiles the decode step (several times faster on GPUs).

## Conversion

{source_note}

{files_note}
{family.extra_card}"""
    return ModelCard("---\n" + data.to_yaml() + "\n---\n" + body).content


def with_model_id(card_text: str, model_id: str) -> str:
    """The card with its usage snippet pointing at ``model_id`` (used when pushing)."""
    return MODEL_ID_LINE.sub(f'model_id = "{model_id}"', card_text, count=1)
