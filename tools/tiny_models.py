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


# --- the tiny *trained* models (tools/train_tiny.py, shipped in tools/trained/<family>/) ------------------------
# Sized for 2 CPU cores and ~2 MB of fp16 weights: a 56 px picture in 8 px patches (7x7 grid, so the 3x3 cells of
# the pictures are visible), 2-layer blocks, 64-wide language models, a Q-Former with 8 queries.

TRAINED_FAMILIES = ("visualglm", "minigpt4", "cogvlm")
_TRAINED_VISION = dict(image_size=56, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4)
_TRAINED_QFORMER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        num_query_tokens=8)


def trained_visualglm_config(tokenizer):
    """VisualGLM for the trained tiny model: EVA ViT (56 px / 8 px patches) → Q-Former (8 queries) → ChatGLM
    (2 layers, hidden 64); token ids from the ice_text-like ``tokenizer``."""
    return tiny_visualglm_config(
        tokenizer,
        vision_config=dict(_TRAINED_VISION),
        qformer_config=dict(_TRAINED_QFORMER),
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                         max_position_embeddings=256),
    )


def trained_minigpt4_config(tokenizer):
    """MiniGPT-4 (Vicuna v0) for the trained tiny model: EVA ViT → Q-Former (8 queries) → projection → LLaMA
    (2 layers, hidden 64); the image placeholder is the first id past the SentencePiece pieces."""
    from ..configuration_minigpt4 import MiniGPT4Config

    vocab = len(tokenizer)
    # head widths of the originals (EVA ViT-g 88, BERT-base 64): MiniGPT-4's files carry no head count, so the
    # converter derives it from them
    return MiniGPT4Config(
        variant="vicuna0",
        vision_config={**_TRAINED_VISION, "hidden_size": 88, "intermediate_size": 176, "num_attention_heads": 1},
        qformer_config={**_TRAINED_QFORMER, "num_attention_heads": 1},
        text_config=dict(vocab_size=vocab + 1, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         use_visual_experts=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=0),
        image_token_id=vocab,
    )


def trained_cogvlm_config(tokenizer):
    """CogVLM (v1: Vicuna tokenizer format, ``chat`` template) for the trained tiny model: EVA2-CLIP-style tower
    (56 px / 8 px patches → 49 + boi/eoi image tokens) → GLU adapter → LLaMA with visual experts (2 layers, 64)."""
    from ..configuration_cogvlm import CogVLMConfig, default_text_config, default_vision_config

    return CogVLMConfig(
        version="cogvlm",
        vision_config={**default_vision_config("cogvlm"), **_TRAINED_VISION},
        text_config={**default_text_config("cogvlm"), "vocab_size": len(tokenizer), "hidden_size": 64,
                     "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 4, "max_position_embeddings": 256,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": 0},
    )


def trained_dir(family: str):
    """The package-data folder of a trained tiny model (``tools/trained/<family>``)."""
    from importlib.resources import files

    if family not in TRAINED_FAMILIES:
        raise ValueError(f"no trained tiny model for {family!r}; known: {TRAINED_FAMILIES}")
    return files("modeling_visualglm.tools") / "trained" / family


def trained_tokenizer(family: str, folder=None):
    """The tokenizer of a trained tiny model, from the SentencePiece model shipped with it."""
    folder = str(folder or trained_dir(family))
    if family == "visualglm":
        from ..tokenization_chatglm import ChatGLMTokenizer

        return ChatGLMTokenizer(vocab_file=f"{folder}/ice_text.model")
    from .tiny_tokenizer import llama_tokenizer_from_model

    if family == "minigpt4":
        from ..processing_minigpt4 import MiniGPT4Tokenizer
        import sentencepiece as spm

        pieces = spm.SentencePieceProcessor(model_file=f"{folder}/tokenizer.model").get_piece_size()
        return llama_tokenizer_from_model(f"{folder}/tokenizer.model", MiniGPT4Tokenizer, image_token_id=pieces)
    return llama_tokenizer_from_model(f"{folder}/tokenizer.model")


def trained_model_class(family: str):
    if family == "visualglm":
        from ..modeling_visualglm import VisualGLMForConditionalGeneration as cls
    elif family == "minigpt4":
        from ..modeling_minigpt4 import MiniGPT4ForConditionalGeneration as cls
    else:
        from ..modeling_cogvlm import CogVLMForConditionalGeneration as cls
    return cls


def load_trained(family: str, folder=None, dtype=torch.float32):
    """(model, tokenizer) of the shipped trained tiny model of ``family``, in ``dtype`` (the file is fp16)."""
    from safetensors.torch import load_file

    folder = str(folder or trained_dir(family))
    cls = trained_model_class(family)
    config = cls.config_class.from_json_file(f"{folder}/config.json")
    model = cls(config)
    state = load_file(f"{folder}/model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(model._tied_weights_keys or {}) if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder}: weights do not fit the config (missing {missing}, unexpected {unexpected})")
    if tied:
        model.tie_weights()
    return model.to(dtype).eval(), trained_tokenizer(family, folder)


# --- CogVLM with a tokenizer's ids (tests/test_cogvlm.py, tests/test_conversion_cogvlm.py) --------------------------

COGVLM_IMAGE_SIZE = {"cogvlm": 56, "cogvlm2": 112}  # CogVLM2's stride-2 conv needs an even grid: 8x8 → 4x4


def tiny_cogvlm_tokenized_config(tokenizer, version: str = "cogvlm"):
    """A CogVLM (56 px, 8 KV heads) or CogVLM2 (112 px, 2 KV heads, vision-expert qkv bias) config with 2-layer
    blocks whose vocabulary and bos/eos ids are ``tokenizer``'s (pad 0)."""
    from ..configuration_cogvlm import CogVLMConfig

    v2 = version == "cogvlm2"
    return CogVLMConfig(
        version=version,
        vision_config=dict(
            image_size=COGVLM_IMAGE_SIZE[version], patch_size=14, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, layer_norm_eps=1e-6, qkv_bias=True,
            layernorm_order="post_sublayer", use_post_layernorm=False, drop_cls_token=True,
        ),
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2 if v2 else 8, vision_qkv_bias=v2,
            rope_theta=500000.0 if v2 else 10000.0, rms_norm_eps=1e-5, max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0,
        ),
    )
