"""Placement and quantization plumbing of every family, on the CPU.

- A saved tiny model reloaded with a ``device_map`` that spreads it over "cpu" and "disk" (accelerate's
  offload hooks, the path ``device_map="auto"`` takes when a GPU is too small) generates exactly the tokens of
  the model held in memory.
- ``quantization_skip_modules`` (what the docs pass to ``BitsAndBytesConfig(llm_int8_skip_modules=...)``)
  leaves exactly the language model's linear layers to quantize, judged by transformers' own matching rule.

The real-size GPU runs (GPU + CPU splits, 4-bit / 8-bit) are in ``python -m benchmarks.bench split`` / ``quant``; their results
are in docs/performance.md.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from modeling_visualglm.modeling_cogvlm import CogVLMForConditionalGeneration
from modeling_visualglm.modeling_minigpt4 import MiniGPT4ForConditionalGeneration
from modeling_visualglm.modeling_visualglm import VisualGLMForConditionalGeneration
from modeling_visualglm.tools.tiny_models import (
    randomize_,
    tiny_cogvlm_config,
    tiny_minigpt4_config,
    tiny_visualglm_config,
)


def _cogvlm(version):
    return CogVLMForConditionalGeneration(tiny_cogvlm_config(version)), lambda body, img: [1] + img + body


def _minigpt4():
    return MiniGPT4ForConditionalGeneration(tiny_minigpt4_config()), lambda body, img: [1] + body[:3] + img + body[3:]


def _visualglm():
    cfg = tiny_visualglm_config(None)
    t = cfg.text_config
    return VisualGLMForConditionalGeneration(cfg), lambda body, img: body[:2] + img + body[2:] + [
        t.gmask_token_id, t.bos_token_id]


FAMILIES = {
    "visualglm": _visualglm,
    "cogvlm": lambda: _cogvlm("cogvlm"),
    "cogvlm2": lambda: _cogvlm("cogvlm2"),
    "minigpt4": _minigpt4,
}


def _build(family):
    model, layout = FAMILIES[family]()
    randomize_(model, seed=0).eval()
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    rows = [layout(torch.randint(5, 120, (n,), generator=gen).tolist(), [cfg.image_token_id] * cfg.num_image_tokens)
            for n in (5, 9)]  # ragged: the first row is left-padded
    width = max(map(len, rows))
    pad = cfg.text_config.pad_token_id
    inputs = dict(
        input_ids=torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
        attention_mask=torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        pixel_values=torch.randn(2, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=gen),
    )
    return model, inputs


def _rel(ours, ref):
    """CONTRACTS §5: max |ours - ref| / max |ref|."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _greedy(model, inputs):
    out = model.generate(**inputs, do_sample=False, max_new_tokens=6, min_new_tokens=6, eos_token_id=None,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


def _spread_map(model):
    """Top-level modules on the CPU except the vision tower; language-model layers alternate cpu / disk."""
    device_map = {}
    for name, child in model.named_children():
        if name != "language_model":
            device_map[name] = "disk" if name == "vision_model" else "cpu"
            continue
        for sub, _ in child.named_children():
            if sub == "layers":
                for i in range(len(child.layers)):
                    device_map[f"language_model.layers.{i}"] = "disk" if i % 2 else "cpu"
            else:
                device_map[f"language_model.{sub}"] = "cpu"
    return device_map


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_offloaded_device_map_generates_the_same_tokens(family, tmp_path):
    model, inputs = _build(family)
    ref_tokens, ref_logits = _greedy(model, inputs)
    model.save_pretrained(tmp_path / "model")
    device_map = _spread_map(model)
    placed = type(model).from_pretrained(tmp_path / "model", device_map=device_map,
                                         offload_folder=str(tmp_path / "offload")).eval()
    assert set(placed.hf_device_map.values()) == {"cpu", "disk"}
    assert placed.hf_device_map["vision_model"] == "disk"
    # the offloaded weights are not held by the module: accelerate loads them per call
    assert any(p.device.type == "meta" for p in placed.language_model.layers[1].parameters())
    tokens, logits = _greedy(placed, inputs)
    assert _rel(logits, ref_logits) <= 1e-4
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantization_skip_modules_leave_exactly_the_language_model(family):
    model, _ = FAMILIES[family]()
    skip = type(model).quantization_skip_modules
    children = dict(model.named_children())
    assert set(skip) | {"language_model"} == set(children), "every module outside the language model is skipped"
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    converted = {name for name in linears if should_convert_module(name, skip)}
    expected = {name for name in linears if name.startswith("language_model.")}
    assert expected, "the language model has linear layers to quantize"
    assert converted == expected


def test_no_split_modules_name_real_blocks():
    """accelerate keeps each named block on one device; a misspelt name would let it cut a layer in half."""
    for family in FAMILIES:
        model, _ = FAMILIES[family]()
        classes = {type(m).__name__ for m in model.modules()}
        no_split = set(model._no_split_modules)  # post_init gathers the sub-models' lists
        assert no_split, family
        assert no_split <= classes, (family, no_split - classes)
        # the decoder layers of the language model are among them
        assert type(model.language_model.layers[0]).__name__ in no_split, family


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_static_cache_generates_the_same_tokens(family):
    """docs/gpu.md recommends the static cache on GPUs: same greedy tokens and logits as the dynamic one."""
    model, inputs = _build(family)
    tokens, logits = _greedy(model, inputs)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=6, min_new_tokens=6, eos_token_id=None,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                         cache_implementation="static")
    assert _rel(torch.stack(out.logits, 1), logits) <= 1e-4
    assert torch.equal(out.sequences, tokens)


def test_model_cards_give_each_family_its_skip_list():
    """Hub folders' README shows the 4-bit recipe with the class's own list, not a hand-copied one."""
    import json

    from modeling_visualglm.hub_export.card import render_card
    from modeling_visualglm.hub_export.families import FAMILIES as HUB_FAMILIES

    for family in HUB_FAMILIES.values():
        card = render_card(family, model_id="org/model", source_note="", files_note="", complete=True)
        skip = family.model.load().quantization_skip_modules
        assert f"llm_int8_skip_modules={json.dumps(list(skip))}" in card, family.name
