"""The README.md model card: YAML metadata (huggingface_hub ``ModelCardData``) and a usage snippet."""

from __future__ import annotations

import json
import re

from huggingface_hub import ModelCard, ModelCardData

from .families import Family

MODEL_ID_LINE = re.compile(r'^model_id = ".*"$', flags=re.MULTILINE)


def render_card(family: Family, *, model_id: str, source_note: str, files_note: str, complete: bool) -> str:
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
    skip = json.dumps(list(family.model.load().quantization_skip_modules))
    body = f"""
# {family.title} (transformers remote code)

{family.summary}
{status}
## Usage

Needs `transformers>=5.17`, `torch`, `sentencepiece` and `pillow`; the model code ships in this repository,
so pass `trust_remote_code=True`.

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

`chat` uses the original defaults (sampling with top_p 0.4, top_k 100, temperature 0.8, repetition
penalty 1.2, `max_length` 1024, `min_length` 100 — which counts the prompt); pass e.g.
`do_sample=False, max_new_tokens=64, min_length=0` to change them. `stream_chat` yields partial answers.
The same defaults are in `generation_config.json` for `generate()`; `AutoProcessor` builds batched
`input_ids` / `pixel_values` (and has a chat template) for `generate()` and pipelines.

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
