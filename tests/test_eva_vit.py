"""EvaVisionModel (BLIP-2 EVA ViT + ln_vision) against SwissArmyTransformer and transformers' BLIP-2 tower.

Tiny, seeded, float32, every parameter random (LayerNorm weights and biases too). 56 px images with
14 px patches give a 4x4 grid, so patch order (row-major) and CLS placement are visible.
"""

import pytest
import torch

from helpers import (
    assert_batch_matches_single, assert_checkpointing_matches_plain_backward, randomize_scaled_, rel_err,
    sat_vit_to_ours,
)
from torch import nn

from modeling_visualglm.configuration_blocks import EvaVisionConfig
from modeling_visualglm.eva_vit import EvaVisionModel

from sat_reference import blip2_sat_classes

HIDDEN, HEADS, INTER, LAYERS, IMAGE, PATCH = 32, 4, 80, 2, 56, 14


def tiny_config(**overrides) -> EvaVisionConfig:
    kwargs = dict(
        image_size=IMAGE, patch_size=PATCH, hidden_size=HIDDEN, intermediate_size=INTER,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, layer_norm_eps=1e-6, post_layernorm_eps=1e-5,
    )
    kwargs.update(overrides)
    return EvaVisionConfig(**kwargs)


def pixels(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def make_model(seed: int = 0, **overrides) -> EvaVisionModel:
    model = EvaVisionModel(tiny_config(**overrides)).eval()
    randomize_scaled_(model, seed)
    return model


# --- SwissArmyTransformer reference, built the way VisualGLM-6B's model/blip2.py EVAViT builds it ------------


def build_sat_evavit():
    """SAT ViTModel with VisualGLM's eva_args (scaled down) and the ``cls`` mixin swapped for ln_vision.

    blip2.py's EVAViT deletes ViTModel's classifier mixin, adds one whose ``final_forward`` applies an
    ``nn.LayerNorm(hidden)`` (default eps 1e-5) named ``ln_vision`` to all tokens, and feeds one dummy id
    (the CLS lookup), no position ids and an all-ones [[1.]] mask.
    """
    EVAViT, _ = blip2_sat_classes()

    class SatEvaViT(EVAViT):
        def forward(self, image):
            ids = torch.zeros(image.shape[0], 1, dtype=torch.long)
            mask = torch.tensor([[1.0]], dtype=image.dtype)
            return super().forward(input_ids=ids, position_ids=None, attention_mask=mask, image=image)

    # The VisualGLM-6B eva_args with sizes shrunk (real: 39 layers, 1408 hidden, 16 heads, 6144, 224 px).
    args = SatEvaViT.get_args(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        vocab_size=1,
        layernorm_order="pre",
        model_parallel_size=1,
        max_sequence_length=(IMAGE // PATCH) ** 2 + 1,
        inner_hidden_size=INTER,
        use_final_layernorm=False,
        layernorm_epsilon=1e-6,
        image_size=[IMAGE, IMAGE],
        pre_len=1,
        post_len=0,
        in_channels=3,
        num_classes=0,
        patch_size=PATCH,
    )
    return SatEvaViT(args).eval()


def sat_to_ours(sat_sd: dict) -> dict:
    """SAT ``mixins.eva.model.vit.*`` keys (without that prefix) → ours: the ViT names plus BLIP-2's ln_vision."""
    return sat_vit_to_ours(sat_sd, {"mixins.cls.ln_vision.weight": "post_layernorm.weight",
                                    "mixins.cls.ln_vision.bias": "post_layernorm.bias"})


def test_matches_sat_visualglm_evavit():
    torch.manual_seed(0)
    sat_model = build_sat_evavit()
    randomize_scaled_(sat_model, seed=1)
    sat_sd = {k: v for k, v in sat_model.state_dict().items()}
    # the K slice of the qkv bias is random here; it cannot change attention (constant per query row)
    ours = EvaVisionModel(tiny_config()).eval()
    ours.load_state_dict(sat_to_ours(sat_sd), strict=True)

    x = pixels(2)
    with torch.no_grad():
        ref = sat_model(x)[0]
        out = ours(pixel_values=x).last_hidden_state
    assert out.shape == ref.shape == (2, 1 + (IMAGE // PATCH) ** 2, HIDDEN)
    # Contract: 1e-4. fp32 reproduces SAT to ~1e-7, and tanh-GELU instead of erf-GELU moves this tiny
    # model by only ~1e-4, so hold it to 1e-5.
    assert rel_err(out, ref) <= 1e-5


def test_matches_transformers_blip2_vision_model():
    from transformers import Blip2VisionConfig, Blip2VisionModel

    ours = make_model(seed=2)
    with torch.no_grad():
        # BLIP-2 checkpoints carry only q_bias and v_bias (transformers puts zeros between them): compare
        # like for like. (A K bias cannot change attention anyway: it shifts a query's scores uniformly.)
        for layer in ours.layers:
            layer.attention.query_key_value.bias[HIDDEN : 2 * HIDDEN] = 0.0
    cfg = Blip2VisionConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=IMAGE, patch_size=PATCH, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
        attention_dropout=0.0,
    )
    hf = Blip2VisionModel(cfg).eval()
    # transformers uses one eps for the blocks and post_layernorm; BLIP-2's ln_vision has its own.
    hf.post_layernorm.eps = ours.config.post_layernorm_eps
    sd = ours.state_dict()
    hf_sd = {
        "embeddings.class_embedding": sd["embeddings.cls_embedding"].view(1, 1, HIDDEN),
        "embeddings.position_embedding": sd["embeddings.position_embedding"].unsqueeze(0),
        "embeddings.patch_embedding.weight": sd["embeddings.patch_embedding.weight"],
        "embeddings.patch_embedding.bias": sd["embeddings.patch_embedding.bias"],
        "post_layernorm.weight": sd["post_layernorm.weight"],
        "post_layernorm.bias": sd["post_layernorm.bias"],
    }
    pairs = {
        "layer_norm1": "input_layernorm",
        "self_attn.qkv": "attention.query_key_value",
        "self_attn.projection": "attention.dense",
        "layer_norm2": "post_attention_layernorm",
        "mlp.fc1": "mlp.dense_h_to_4h",
        "mlp.fc2": "mlp.dense_4h_to_h",
    }
    for i in range(LAYERS):
        for hf_name, our_name in pairs.items():
            for leaf in ("weight", "bias"):
                hf_sd[f"encoder.layers.{i}.{hf_name}.{leaf}"] = sd[f"layers.{i}.{our_name}.{leaf}"]
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)

    x = pixels(2, seed=3)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        out = ours(pixel_values=x).last_hidden_state
    assert rel_err(out, ref) <= 1e-5


def test_post_layernorm_uses_its_own_eps():
    # exaggerated eps values so that swapping them would be far outside the tolerance
    model = make_model(seed=4, layer_norm_eps=1e-6, post_layernorm_eps=0.5)
    assert model.post_layernorm.eps == 0.5
    for layer in model.layers:
        assert layer.input_layernorm.eps == layer.post_attention_layernorm.eps == 1e-6
    with torch.no_grad():
        out = model(pixel_values=pixels(1), output_hidden_states=True)
    pre = out.hidden_states[-1]
    w, b = model.post_layernorm.weight, model.post_layernorm.bias
    expected = nn.functional.layer_norm(pre, (HIDDEN,), w, b, eps=0.5)
    wrong = nn.functional.layer_norm(pre, (HIDDEN,), w, b, eps=1e-6)
    assert rel_err(out.last_hidden_state, expected) <= 1e-6
    assert rel_err(out.last_hidden_state, wrong) > 1e-3


def test_without_post_layernorm_returns_last_block_output():
    model = make_model(seed=5, use_post_layernorm=False)
    assert model.post_layernorm is None
    assert not any(k.startswith("post_layernorm") for k in model.state_dict())
    with torch.no_grad():
        out = model(pixel_values=pixels(1), output_hidden_states=True)
    assert len(out.hidden_states) == LAYERS + 1
    torch.testing.assert_close(out.last_hidden_state, out.hidden_states[-1], rtol=0, atol=0)


def test_eager_matches_sdpa():
    model = make_model(seed=6)
    assert model.config._attn_implementation == "sdpa"
    x = pixels(2, seed=7)
    with torch.no_grad():
        sdpa = model(pixel_values=x).last_hidden_state
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        eager = model(pixel_values=x).last_hidden_state
    assert rel_err(eager, sdpa) <= 1e-5


def test_batch_matches_single():
    assert_batch_matches_single(make_model(seed=8), pixels(3, seed=9), "pixel_values")


def test_gradient_checkpointing_matches_plain_backward():
    assert_checkpointing_matches_plain_backward(make_model(seed=10), pixels(2, seed=11), "pixel_values")


def test_pixel_values_cast_to_tower_dtype():
    model = make_model(seed=12).to(torch.float64)
    out = model(pixel_values=pixels(1).float()).last_hidden_state
    assert out.dtype == torch.float64


def test_wrong_image_size_raises():
    model = make_model(seed=13)
    with pytest.raises(ValueError, match="patches"):
        model(pixel_values=torch.randn(1, 3, IMAGE + PATCH, IMAGE + PATCH))


def test_init_weights_covers_every_parameter(tmp_path):
    config = tiny_config(initializer_range=0.02)
    model = EvaVisionModel(config)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if name.endswith("cls_embedding") or name.endswith("position_embedding") or name.endswith(".weight"):
            if "layernorm" in name:
                assert torch.equal(p, torch.ones_like(p)), name
            else:
                assert 0.005 < p.std().item() < 0.05, name
    # save → load keeps the weights (transformers must not re-initialize them on load)
    randomize_scaled_(model, seed=14)
    model.save_pretrained(tmp_path)
    loaded = EvaVisionModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
