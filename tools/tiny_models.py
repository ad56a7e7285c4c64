"""Tiny seeded models for tests, the demo and docs (not part of the remote code shipped to the Hub).

CONTRACTS §6: 2 layers, hidden 32-64, every parameter random (LayerNorm weights and biases too), seeded;
images of 56 px with 14 px patches give a 4x4 patch grid, so patch order is visible.
"""

from __future__ import annotations

import torch

from ..configuration_visualglm import VisualGLMConfig


def tiny_visualglm_config(tokenizer=None, *, image_size: int = 56, vocab_size: int | None = None, **overrides):
    """A VisualGLM config with 2-layer blocks; token ids come from ``tokenizer`` when given."""
    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=512)
    if tokenizer is not None:
        # the <image> placeholder id is the first id after the SentencePiece pieces. Like the real
        # checkpoint (130528 rows for 130344 pieces + <image> at 130344) the table has a row for it: it is
        # never looked up, but transformers < 5.2x's repetition penalty gathers scores at every prompt id.
        text.update(
            vocab_size=vocab_size or tokenizer.image_token_id + 1,
            bos_token_id=tokenizer.sop_token_id,
            eos_token_id=tokenizer.eop_token_id,
            pad_token_id=tokenizer.pad_token_id,
            mask_token_id=tokenizer.mask_token_id,
            gmask_token_id=tokenizer.gmask_token_id,
        )
        image_token_id = tokenizer.image_token_id
    else:
        text.update(vocab_size=vocab_size or 200, bos_token_id=130, eos_token_id=131, pad_token_id=3,
                    mask_token_id=128, gmask_token_id=129)
        image_token_id = 199
    cfg = dict(
        vision_config=dict(image_size=image_size, patch_size=14, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            num_query_tokens=32),
        text_config=text,
        image_token_id=image_token_id,
    )
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return VisualGLMConfig(**cfg)


_TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=200,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
_TINY_VISION = dict(patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def tiny_cogvlm_config(version: str = "cogvlm"):
    """A CogVLM (``version="cogvlm"``, 56 px, 4 KV heads) or CogVLM2 (112 px, so the stride-2 conv sees an
    even 8x8 grid; 2 KV heads) config with 2-layer blocks and a 200-id vocabulary (bos 1, eos 2, pad 0)."""
    from ..configuration_cogvlm import CogVLMConfig, default_text_config, default_vision_config

    return CogVLMConfig(
        version=version,
        vision_config={**default_vision_config(version), **_TINY_VISION,
                       "image_size": 112 if version == "cogvlm2" else 56},
        text_config={**default_text_config(version), **_TINY_TEXT,
                     "num_key_value_heads": 2 if version == "cogvlm2" else 4},
    )


def tiny_minigpt4_config():
    """A Vicuna-v0 MiniGPT-4 config with 2-layer blocks, a 200-id vocabulary and the placeholder at id 199."""
    from ..configuration_minigpt4 import MiniGPT4Config

    return MiniGPT4Config(
        variant="vicuna0",
        vision_config={**_TINY_VISION, "image_size": 56},
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        text_config={**_TINY_TEXT, "num_key_value_heads": 4, "use_visual_experts": False},
        image_token_id=199,
    )


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Fill every parameter with seeded noise: weights N(0, std), norm weights N(0, 1) (sign included)."""
    gen = torch.Generator().manual_seed(seed)
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen:  # tied weights
            continue
        seen.add(id(param))
        if param.ndim == 1 and "norm" in name and name.endswith("weight"):
            param.copy_(torch.randn(param.shape, generator=gen))
        else:
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


def demo_image_path() -> str:
    from importlib.resources import files

    return str(files("modeling_visualglm.tools") / "assets" / "demo.png")
