"""EVA2-CLIP-E (CogVLM's tower) as the ``post_sublayer`` variant of EvaVisionModel, against
SwissArmyTransformer 0.4.12's ``EVA2CLIPModel`` on mapped weights.

Tiny, seeded, float32, every parameter random (LayerNorm weights and biases, CLS, positions too).
56 px images with 14 px patches give a 4x4 grid, so patch order and the dropped CLS are visible.
"""

import copy

import pytest
import torch
from torch import nn

from modeling_visualglm.configuration_blocks import EvaVisionConfig
from modeling_visualglm.eva_vit import EvaVisionModel

from helpers import randomize_scaled_, rel_err, sat_vit_to_ours
from sat_reference import import_sat

HIDDEN, HEADS, INTER, LAYERS, IMAGE, PATCH = 48, 4, 96, 2, 56, 14
GRID = IMAGE // PATCH


def eva2_config(**overrides) -> EvaVisionConfig:
    # CogVLM's eva_args scaled down (real: 63 layers, 1792 hidden, 16 heads, 15360 MLP, 490 px)
    kwargs = dict(
        image_size=IMAGE, patch_size=PATCH, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
        layernorm_order="post_sublayer", use_post_layernorm=False, drop_cls_token=True,
    )
    kwargs.update(overrides)
    return EvaVisionConfig(**kwargs)


def pixels(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def build_sat_eva2clip():
    """SAT ``EVA2CLIPModel`` with CogVLM's eva_args shrunk; called the way CogVLM's ImageMixin calls it
    (one dummy id for the CLS lookup, no position ids, an all-ones [[1.]] mask)."""
    import_sat()
    from sat.model.official.eva_clip_model import EVA2CLIPModel

    class SatEva2(EVA2CLIPModel):
        def forward(self, image):
            ids = torch.zeros(image.shape[0], 1, dtype=torch.long)
            mask = torch.tensor([[1.0]], dtype=image.dtype)
            return super().forward(input_ids=ids, position_ids=None, attention_mask=mask, image=image)

    args = SatEva2.get_args(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, vocab_size=1, model_parallel_size=1,
        inner_hidden_size=INTER, use_final_layernorm=False, layernorm_epsilon=1e-6, image_size=[IMAGE, IMAGE],
        pre_len=1, post_len=0, in_channels=3, patch_size=PATCH, hidden_dropout=0.0, attention_dropout=0.0,
    )
    return SatEva2(args).eval()


def sat_to_ours(sat_sd: dict) -> dict:
    """SAT ``mixins.eva.vit_model.*`` keys (without that prefix) → ours: the plain ViT names."""
    return sat_vit_to_ours(sat_sd)


@pytest.fixture(scope="module")
def sat_pair():
    torch.manual_seed(0)
    sat_model = build_sat_eva2clip()
    randomize_scaled_(sat_model, seed=1)
    ours = EvaVisionModel(eva2_config()).eval()
    ours.load_state_dict(sat_to_ours(sat_model.state_dict()), strict=True)
    return sat_model, ours


def test_matches_sat_eva2clip(sat_pair):
    sat_model, ours = sat_pair
    x = pixels(2)
    with torch.no_grad():
        ref = sat_model(x)[0]
        out = ours(pixel_values=x).last_hidden_state
    assert out.shape == ref.shape == (2, GRID * GRID, HIDDEN)  # CLS dropped
    assert rel_err(out, ref) <= 1e-5


def test_pre_ln_order_would_differ(sat_pair):
    # the variant flag really changes the math: the same weights in pre-LN order are far from SAT
    sat_model, ours = sat_pair
    pre = EvaVisionModel(eva2_config(layernorm_order="pre")).eval()
    pre.load_state_dict(ours.state_dict())
    x = pixels(1, seed=2)
    with torch.no_grad():
        assert rel_err(pre(pixel_values=x).last_hidden_state, sat_model(x)[0]) > 1e-2


def test_post_sublayer_layer_math():
    # one block by hand: x + LN_in(Attn(x)), then + LN_post(MLP(x)); no norm after the last block
    model = EvaVisionModel(eva2_config(num_hidden_layers=1, drop_cls_token=False)).eval()
    randomize_scaled_(model, seed=3)
    layer = model.layers[0]
    x = pixels(1, seed=4)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
        h0 = out.hidden_states[0]
        h1 = h0 + layer.input_layernorm(layer.attention(h0))
        h2 = h1 + layer.post_attention_layernorm(layer.mlp(h1))
    assert rel_err(out.last_hidden_state, h2) <= 1e-6
    assert out.last_hidden_state.shape == (1, 1 + GRID * GRID, HIDDEN)
    assert not any(k.startswith("post_layernorm") for k in model.state_dict())


def test_eager_matches_sdpa_and_batch_matches_single(sat_pair):
    _, ours = sat_pair
    model = copy.deepcopy(ours)
    x = pixels(3, seed=5)
    with torch.no_grad():
        sdpa = model(pixel_values=x).last_hidden_state
        singles = torch.cat([model(pixel_values=x[i : i + 1]).last_hidden_state for i in range(3)])
        model.set_attn_implementation("eager")
        eager = model(pixel_values=x).last_hidden_state
    assert rel_err(eager, sdpa) <= 1e-5
    assert rel_err(singles, sdpa) <= 1e-5


def test_bad_layernorm_order():
    with pytest.raises(ValueError, match="layernorm_order"):
        eva2_config(layernorm_order="post")
