"""QFormerModel (BLIP-2 Q-Former, SAT "post" layer order) against SwissArmyTransformer and transformers.

Tiny, seeded, float32, every parameter random (LayerNorm weights and biases too). The image side is a
(B, 1 + 4x4, E) tensor with E != H so that the cross-attention's input width is exercised.
"""

import torch

from helpers import (
    assert_batch_matches_single, assert_checkpointing_matches_plain_backward, randomize_scaled_, rel_err,
)
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from modeling_visualglm.configuration_blocks import QFormerConfig
from modeling_visualglm.qformer import QFormerModel

from sat_reference import blip2_sat_classes

HIDDEN, HEADS, INTER, LAYERS, QUERIES, ENC, ENC_LEN = 32, 4, 64, 2, 8, 48, 17


def tiny_config(**overrides) -> QFormerConfig:
    kwargs = dict(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=INTER,
        num_query_tokens=QUERIES, encoder_hidden_size=ENC, cross_attention_frequency=2, layer_norm_eps=1e-12,
    )
    kwargs.update(overrides)
    return QFormerConfig(**kwargs)


def image_tokens(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, ENC_LEN, ENC, generator=torch.Generator().manual_seed(seed))


def make_model(seed: int = 0, **overrides) -> QFormerModel:
    model = QFormerModel(tiny_config(**overrides)).eval()
    randomize_scaled_(model, seed)
    return model


def test_layer_structure_follows_cross_attention_frequency():
    model = QFormerModel(tiny_config(num_hidden_layers=4))
    assert [layer.has_cross_attention for layer in model.layers] == [True, False, True, False]
    assert hasattr(model.layers[0], "cross_attention") and not hasattr(model.layers[1], "cross_attention")
    assert model.layers[0].cross_attention.key_value.weight.shape == (2 * HIDDEN, ENC)
    assert model.query_tokens.shape == (QUERIES, HIDDEN)


# --- SwissArmyTransformer reference, built the way VisualGLM-6B's model/blip2.py QFormer builds it ----------


def build_sat_qformer():
    """SAT BaseModel with VisualGLM's qformer_args (scaled down), as blip2.py's QFormer configures it.

    blip2.py: exact GELU, ``transformer.position_embeddings = None`` and a ``position_embedding_forward``
    returning None (no positions), identity ``final_forward`` (no LM head), input ids 0..Q-1 (the query
    table), all-ones [[1.]] self and cross masks.
    """
    _, QFormer = blip2_sat_classes()

    class SatQFormer(QFormer):
        def forward(self, encoder_outputs):
            ids = torch.arange(QUERIES).unsqueeze(0).expand(encoder_outputs.shape[0], -1)
            ones = torch.tensor([[1.0]], dtype=encoder_outputs.dtype)
            return super().forward(
                input_ids=ids,
                position_ids=None,
                attention_mask=ones,
                encoder_outputs=encoder_outputs,
                cross_attention_mask=ones,
            )

    # The VisualGLM-6B qformer_args with sizes shrunk (real: 12 layers, 768 hidden, 12 heads, 32 queries,
    # cross_attn_hidden_size 1408, is_decoder [True, False] * 6).
    args = SatQFormer.get_args(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        vocab_size=QUERIES,
        layernorm_order="post",
        model_parallel_size=1,
        max_sequence_length=0,
        is_decoder=[i % 2 == 0 for i in range(LAYERS)],
        cross_attn_hidden_size=ENC,
        layernorm_epsilon=1e-12,
        inner_hidden_size=INTER,
    )
    return SatQFormer(args).eval()


def sat_to_ours(sat_sd: dict) -> dict:
    """Rename SAT ``mixins.eva.model.qformer.*`` keys (without that prefix) to ours; every key must map."""
    out = {}
    for key, value in sat_sd.items():
        if key == "transformer.word_embeddings.weight":
            out["query_tokens"] = value
        elif key.startswith(("transformer.layers.", "transformer.final_layernorm.")):
            out[key[len("transformer.") :]] = value
        else:
            raise AssertionError(f"unmapped SAT key {key}")
    return out


def test_matches_sat_visualglm_qformer():
    torch.manual_seed(0)
    sat_model = build_sat_qformer()
    randomize_scaled_(sat_model, seed=1)
    ours = QFormerModel(tiny_config()).eval()
    ours.load_state_dict(sat_to_ours(sat_model.state_dict()), strict=True)

    enc = image_tokens(2)
    with torch.no_grad():
        ref = sat_model(enc)[0]
        out = ours(encoder_hidden_states=enc).last_hidden_state
    assert out.shape == ref.shape == (2, QUERIES, HIDDEN)
    # contract 1e-4; fp32 reproduces SAT to rounding, so hold it tighter
    assert rel_err(out, ref) <= 1e-5


# --- transformers' Blip2QFormerModel (BERT post-LN) --------------------------------------------------------


def ours_to_transformers(sd: dict, num_layers: int, freq: int) -> dict:
    """Our SAT-order Q-Former → transformers' BERT-order one.

    BERT normalizes at the end of each sub-layer; SAT at the start of the next layer. So HF ``layernorm``
    (the embedding LN) is our layer-0 ``input_layernorm``, and HF layer i's ``output_query.LayerNorm`` is our
    layer i+1 ``input_layernorm`` (or ``final_layernorm`` after the last layer). Fused projections split
    into query/key/value along the output rows (blocked layout).
    """
    H = HIDDEN
    hf = {f"layernorm.{leaf}": sd[f"layers.0.input_layernorm.{leaf}"] for leaf in ("weight", "bias")}
    for i in range(num_layers):
        ours, theirs = f"layers.{i}.", f"encoder.layer.{i}."
        for leaf in ("weight", "bias"):
            qkv = sd[ours + f"attention.query_key_value.{leaf}"]
            for j, name in enumerate(("query", "key", "value")):
                hf[theirs + f"attention.attention.{name}.{leaf}"] = qkv[j * H : (j + 1) * H]
            hf[theirs + f"attention.output.dense.{leaf}"] = sd[ours + f"attention.dense.{leaf}"]
            hf[theirs + f"attention.output.LayerNorm.{leaf}"] = sd[ours + f"post_attention_layernorm.{leaf}"]
            if i % freq == 0:
                hf[theirs + f"crossattention.attention.query.{leaf}"] = sd[ours + f"cross_attention.query.{leaf}"]
                kv = sd[ours + f"cross_attention.key_value.{leaf}"]
                hf[theirs + f"crossattention.attention.key.{leaf}"] = kv[:H]
                hf[theirs + f"crossattention.attention.value.{leaf}"] = kv[H:]
                hf[theirs + f"crossattention.output.dense.{leaf}"] = sd[ours + f"cross_attention.dense.{leaf}"]
                hf[theirs + f"crossattention.output.LayerNorm.{leaf}"] = sd[
                    ours + f"post_cross_attention_layernorm.{leaf}"
                ]
            hf[theirs + f"intermediate_query.dense.{leaf}"] = sd[ours + f"mlp.dense_h_to_4h.{leaf}"]
            hf[theirs + f"output_query.dense.{leaf}"] = sd[ours + f"mlp.dense_4h_to_h.{leaf}"]
            next_ln = f"layers.{i + 1}.input_layernorm.{leaf}" if i + 1 < num_layers else f"final_layernorm.{leaf}"
            hf[theirs + f"output_query.LayerNorm.{leaf}"] = sd[next_ln]
    return hf


def build_transformers_twin(ours: QFormerModel):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    cfg = ours.config
    hf_cfg = Blip2QFormerConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=cfg.layer_norm_eps,
        cross_attention_frequency=cfg.cross_attention_frequency,
        encoder_hidden_size=cfg.encoder_hidden_size,
        use_qformer_text_input=False,
    )
    hf = Blip2QFormerModel(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(
        ours_to_transformers(ours.state_dict(), cfg.num_hidden_layers, cfg.cross_attention_frequency), strict=False
    )
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def test_matches_transformers_blip2_qformer():
    ours = make_model(seed=2)
    hf = build_transformers_twin(ours)
    enc = image_tokens(2, seed=3)
    with torch.no_grad():
        queries = ours.query_tokens.unsqueeze(0).expand(2, -1, -1)
        ref = hf(query_embeds=queries, encoder_hidden_states=enc).last_hidden_state
        out = ours(encoder_hidden_states=enc).last_hidden_state
    assert rel_err(out, ref) <= 1e-5


def test_encoder_attention_mask_matches_transformers_and_truncation():
    ours = make_model(seed=4)
    hf = build_transformers_twin(ours)
    enc = image_tokens(2, seed=5)
    mask = torch.ones(2, ENC_LEN, dtype=torch.long)
    mask[1, 11:] = 0  # row 1: the last 6 image tokens are padding
    with torch.no_grad():
        queries = ours.query_tokens.unsqueeze(0).expand(2, -1, -1)
        ref = hf(query_embeds=queries, encoder_hidden_states=enc, encoder_attention_mask=mask).last_hidden_state
        out = ours(encoder_hidden_states=enc, encoder_attention_mask=mask).last_hidden_state
        # masking the tail must equal dropping it
        cut = ours(encoder_hidden_states=enc[1:, :11]).last_hidden_state
        unmasked = ours(encoder_hidden_states=enc).last_hidden_state
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(out[1:], cut) <= 1e-5
    assert rel_err(out[1:], unmasked[1:]) > 1e-3  # the mask did something


def test_eager_matches_sdpa():
    model = make_model(seed=6)
    assert model.config._attn_implementation == "sdpa"
    enc = image_tokens(2, seed=7)
    mask = torch.ones(2, ENC_LEN, dtype=torch.long)
    mask[0, 9:] = 0
    with torch.no_grad():
        sdpa = model(encoder_hidden_states=enc).last_hidden_state
        sdpa_masked = model(encoder_hidden_states=enc, encoder_attention_mask=mask).last_hidden_state
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        eager = model(encoder_hidden_states=enc).last_hidden_state
        eager_masked = model(encoder_hidden_states=enc, encoder_attention_mask=mask).last_hidden_state
    assert rel_err(eager, sdpa) <= 1e-5
    assert rel_err(eager_masked, sdpa_masked) <= 1e-5


def test_batch_matches_single():
    assert_batch_matches_single(make_model(seed=8), image_tokens(3, seed=9), "encoder_hidden_states")


def test_gradient_checkpointing_matches_plain_backward():
    # gradients also reach the image features through the checkpointed cross-attention
    assert_checkpointing_matches_plain_backward(make_model(seed=10), image_tokens(2, seed=11),
                                                "encoder_hidden_states", input_grad=True)


def test_init_weights_covers_every_parameter():
    model = QFormerModel(tiny_config(initializer_range=0.02))
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if "layernorm" in name:
            expected = torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)
            assert torch.equal(p, expected), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert 0.005 < p.std().item() < 0.05, name


# --- fp32 Q-Former under fp16 loading ----------------------------------------------------------------------


class _ParentConfig(PretrainedConfig):
    model_type = "test_qformer_parent"
    sub_configs = {"qformer_config": QFormerConfig}

    def __init__(self, qformer_config=None, **kwargs):
        if qformer_config is None or isinstance(qformer_config, dict):
            qformer_config = QFormerConfig(**(qformer_config or {}))
        self.qformer_config = qformer_config
        super().__init__(**kwargs)


class _Parent(PreTrainedModel):
    """A family composite in miniature: a Q-Former under ``qformer.`` beside sub-models that also have
    ``layers``, ``final_layernorm`` and ``query_tokens``-like names under their own prefixes."""

    config_class = _ParentConfig

    def __init__(self, config):
        super().__init__(config)
        self.qformer = QFormerModel(config.qformer_config)
        self.language_model = nn.Module()
        self.language_model.layers = nn.ModuleList([nn.Linear(HIDDEN, HIDDEN)])
        self.language_model.final_layernorm = nn.LayerNorm(HIDDEN)
        self.vision_model = nn.Module()
        self.vision_model.layers = nn.ModuleList([nn.Linear(HIDDEN, HIDDEN)])
        self.post_init()


def test_kept_in_fp32_when_loaded_in_fp16(tmp_path):
    model = make_model(seed=12)
    model.save_pretrained(tmp_path / "qformer")
    loaded = QFormerModel.from_pretrained(tmp_path / "qformer", dtype=torch.float16)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    enc = image_tokens(1, seed=13)
    out = loaded(encoder_hidden_states=enc.half()).last_hidden_state
    assert out.dtype == torch.float32
    with torch.no_grad():
        ref = model(encoder_hidden_states=enc.half().float()).last_hidden_state
    assert rel_err(out.detach(), ref) <= 1e-6

    parent = _Parent(_ParentConfig(qformer_config=tiny_config().to_dict()))
    parent.save_pretrained(tmp_path / "parent")
    loaded_parent = _Parent.from_pretrained(tmp_path / "parent", dtype=torch.float16)
    assert {p.dtype for p in loaded_parent.qformer.parameters()} == {torch.float32}
    # the pattern must not pin same-named modules of the other sub-models
    for other in (loaded_parent.language_model, loaded_parent.vision_model):
        assert {p.dtype for p in other.parameters()} == {torch.float16}
