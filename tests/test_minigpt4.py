"""MiniGPT-4 (Vicuna-v0 / LLaMA-2 merge-4 / MiniGPT-v2): tiny random float32 models against independent
re-derivations built from transformers' own classes (Blip2VisionModel, Blip2QFormerModel, LlamaForCausalLM)
and the original's splice of separately embedded segments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modeling_visualglm.configuration_minigpt4 import MiniGPT4Config
from modeling_visualglm.modeling_minigpt4 import MiniGPT4ForConditionalGeneration
from modeling_visualglm.processing_minigpt4 import (
    IMAGE_HERE,
    build_minigpt4_inputs,
    build_minigpt4_prompt,
    legacy_encode,
    process_response,
)

VOCAB = 400  # tokenizer pieces; the model has one more row for the image placeholder
IMAGE_ID = VOCAB
VIT_H, QF_H, TXT_H = 32, 32, 48


def tiny_config(variant="vicuna0", image_size=56, **text) -> MiniGPT4Config:
    vision = dict(image_size=image_size, patch_size=14, hidden_size=VIT_H, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, layer_norm_eps=1e-6, post_layernorm_eps=1e-5)
    qformer = dict(hidden_size=QF_H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   num_query_tokens=8, layer_norm_eps=1e-12) if variant == "vicuna0" else None
    text_cfg = dict(vocab_size=VOCAB + 1, hidden_size=TXT_H, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, rms_norm_eps=1e-6, max_position_embeddings=512, use_visual_experts=False)
    text_cfg.update(text)
    return MiniGPT4Config(variant=variant, vision_config=vision, qformer_config=qformer, text_config=text_cfg,
                          image_token_id=IMAGE_ID)


def randomize_(module: nn.Module, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def make_model(variant="vicuna0", seed=0, **kw) -> MiniGPT4ForConditionalGeneration:
    model = MiniGPT4ForConditionalGeneration(tiny_config(variant, **kw)).eval()
    randomize_(model, seed)
    with torch.no_grad():  # larger output logits: fewer near-ties in greedy decoding
        model.lm_head.weight.mul_(5.0)
    return model


def rel_err(ours, ref) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def pixels(n, size=56, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama_spm(tmp_path_factory):
    """A tiny LLaMA-like SentencePiece BPE model: byte fallback, ids 0-2 = <unk> <s> </s>, and LLaMA's
    normalizer settings (identity, dummy prefix, whitespace kept), trained on tiny_llama_tokenizer's corpus."""
    import sentencepiece as spm
    from tiny_llama_tokenizer import _corpus

    prefix = str(tmp_path_factory.mktemp("minigpt4_spm") / "spm")
    corpus = _corpus() + ["###Human: hi###Assistant: a red box [INST] what [/INST] " * 3]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=prefix, vocab_size=VOCAB, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True)
    return prefix + ".model"


@pytest.fixture(scope="module")
def llama_tokenizer(llama_spm):
    import sentencepiece as spm
    from transformers.convert_slow_tokenizer import generate_merges

    from modeling_visualglm.processing_minigpt4 import MiniGPT4Tokenizer

    sp = spm.SentencePieceProcessor(model_file=llama_spm)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    merges = generate_merges(vocab, scores, skip_tokens={"<unk>", "<s>", "</s>"})
    return MiniGPT4Tokenizer(vocab=vocab, merges=merges, image_token_id=IMAGE_ID)


# --- independent reference: transformers' BLIP-2 and Llama on mapped weights ---------------------------------


def hf_vision(model):
    """transformers' Blip2VisionModel with our tower's weights; post_layernorm set to ln_vision's eps 1e-5."""
    from transformers import Blip2VisionConfig, Blip2VisionModel

    vc = model.config.vision_config
    hf = Blip2VisionModel(Blip2VisionConfig(
        hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size, num_hidden_layers=vc.num_hidden_layers,
        num_attention_heads=vc.num_attention_heads, image_size=vc.image_size, patch_size=vc.patch_size,
        layer_norm_eps=vc.layer_norm_eps, qkv_bias=True, attention_dropout=0.0)).eval()
    sd = model.vision_model.state_dict()
    m = {
        "embeddings.class_embedding": sd["embeddings.cls_embedding"][None],
        "embeddings.position_embedding": sd["embeddings.position_embedding"][None],
        "embeddings.patch_embedding.weight": sd["embeddings.patch_embedding.weight"],
        "embeddings.patch_embedding.bias": sd["embeddings.patch_embedding.bias"],
        "post_layernorm.weight": sd["post_layernorm.weight"], "post_layernorm.bias": sd["post_layernorm.bias"],
    }
    for i in range(vc.num_hidden_layers):
        o, t = f"layers.{i}.", f"encoder.layers.{i}."
        for wb in ("weight", "bias"):
            m[t + f"layer_norm1.{wb}"] = sd[o + f"input_layernorm.{wb}"]
            m[t + f"layer_norm2.{wb}"] = sd[o + f"post_attention_layernorm.{wb}"]
            m[t + f"self_attn.qkv.{wb}"] = sd[o + f"attention.query_key_value.{wb}"]
            m[t + f"self_attn.projection.{wb}"] = sd[o + f"attention.dense.{wb}"]
            m[t + f"mlp.fc1.{wb}"] = sd[o + f"mlp.dense_h_to_4h.{wb}"]
            m[t + f"mlp.fc2.{wb}"] = sd[o + f"mlp.dense_4h_to_h.{wb}"]
    hf.load_state_dict(m, strict=True)
    hf.post_layernorm.eps = vc.post_layernorm_eps  # BLIP-2's ln_vision is nn.LayerNorm(1408), eps 1e-5
    return hf


def hf_qformer(model):
    """transformers' Blip2QFormerModel (BERT post-LN order) with our SAT-order Q-Former's weights."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    qc = model.config.qformer_config
    hf = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=qc.hidden_size, num_hidden_layers=qc.num_hidden_layers, num_attention_heads=qc.num_attention_heads,
        intermediate_size=qc.intermediate_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        layer_norm_eps=qc.layer_norm_eps, cross_attention_frequency=qc.cross_attention_frequency,
        encoder_hidden_size=qc.encoder_hidden_size, use_qformer_text_input=False)).eval()
    sd, H, n = model.qformer.state_dict(), qc.hidden_size, qc.num_hidden_layers
    m = {f"layernorm.{wb}": sd[f"layers.0.input_layernorm.{wb}"] for wb in ("weight", "bias")}
    for i in range(n):
        o, t = f"layers.{i}.", f"encoder.layer.{i}."
        for wb in ("weight", "bias"):
            qkv = sd[o + f"attention.query_key_value.{wb}"]
            for j, name in enumerate(("query", "key", "value")):
                m[t + f"attention.attention.{name}.{wb}"] = qkv[j * H:(j + 1) * H]
            m[t + f"attention.output.dense.{wb}"] = sd[o + f"attention.dense.{wb}"]
            m[t + f"attention.output.LayerNorm.{wb}"] = sd[o + f"post_attention_layernorm.{wb}"]
            if i % qc.cross_attention_frequency == 0:
                m[t + f"crossattention.attention.query.{wb}"] = sd[o + f"cross_attention.query.{wb}"]
                kv = sd[o + f"cross_attention.key_value.{wb}"]
                m[t + f"crossattention.attention.key.{wb}"] = kv[:H]
                m[t + f"crossattention.attention.value.{wb}"] = kv[H:]
                m[t + f"crossattention.output.dense.{wb}"] = sd[o + f"cross_attention.dense.{wb}"]
                m[t + f"crossattention.output.LayerNorm.{wb}"] = sd[o + f"post_cross_attention_layernorm.{wb}"]
            m[t + f"intermediate_query.dense.{wb}"] = sd[o + f"mlp.dense_h_to_4h.{wb}"]
            m[t + f"output_query.dense.{wb}"] = sd[o + f"mlp.dense_4h_to_h.{wb}"]
            nxt = f"layers.{i + 1}.input_layernorm.{wb}" if i + 1 < n else f"final_layernorm.{wb}"
            m[t + f"output_query.LayerNorm.{wb}"] = sd[nxt]
    missing, unexpected = hf.load_state_dict(m, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def hf_llama(model):
    from transformers import LlamaConfig, LlamaForCausalLM

    tc = model.config.text_config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_hidden_layers, num_attention_heads=tc.num_attention_heads,
        rms_norm_eps=tc.rms_norm_eps, max_position_embeddings=tc.max_position_embeddings,
        rope_theta=tc.rope_theta, tie_word_embeddings=False)).eval()
    sd, H = model.state_dict(), tc.hidden_size
    m = {"model.embed_tokens.weight": sd["language_model.embed_tokens.weight"],
         "model.norm.weight": sd["language_model.norm.weight"], "lm_head.weight": sd["lm_head.weight"]}
    for i in range(tc.num_hidden_layers):
        o, t = f"language_model.layers.{i}.", f"model.layers.{i}."
        q, k, v = sd[o + "self_attn.language_expert_query_key_value.weight"].split(H)
        m.update({t + "self_attn.q_proj.weight": q, t + "self_attn.k_proj.weight": k, t + "self_attn.v_proj.weight": v,
                  t + "self_attn.o_proj.weight": sd[o + "self_attn.language_expert_dense.weight"],
                  t + "input_layernorm.weight": sd[o + "input_layernorm.weight"],
                  t + "post_attention_layernorm.weight": sd[o + "post_attention_layernorm.weight"]})
        for p in ("gate_proj", "up_proj", "down_proj"):
            m[t + f"mlp.{p}.weight"] = sd[o + f"mlp.language_mlp.{p}.weight"]
    hf.load_state_dict(m, strict=True)
    return hf


def reference_image_embeds(model, pix):
    """The original ``encode_img``: ln_vision(ViT) → Q-Former → llama_proj, or drop CLS → view(B, P/4, 4H) →
    llama_proj, computed with transformers' BLIP-2 classes."""
    with torch.no_grad():
        vis = hf_vision(model)(pixel_values=pix).last_hidden_state  # post_layernorm = ln_vision
        if model.config.variant == "vicuna0":
            queries = model.qformer.query_tokens[None].expand(pix.shape[0], -1, -1)
            feats = hf_qformer(model)(query_embeds=queries, encoder_hidden_states=vis).last_hidden_state
        else:
            patches = vis[:, 1:, :]
            bs, pn, hs = patches.shape
            feats = patches.reshape(bs, pn // 4, hs * 4)
        return nn.functional.linear(feats, model.llama_proj.weight, model.llama_proj.bias)


def reference_logits(model, segments: list[list[int]], pix):
    """``get_context_emb``: embed each separately tokenized segment, interleave [seg0, img0, seg1, ...],
    run the language model on the concatenated embeddings."""
    llama = hf_llama(model)
    img = reference_image_embeds(model, pix)
    with torch.no_grad():
        embs = []
        for i, seg in enumerate(segments):
            embs.append(llama.model.embed_tokens(torch.tensor([seg])))
            if i < len(segments) - 1:
                embs.append(img[i:i + 1])
        return llama(inputs_embeds=torch.cat(embs, dim=1)).logits


# --- tests --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["vicuna0", "llama2"])
def test_image_path_matches_transformers_blip2(variant):
    model = make_model(variant, seed=3)
    pix = pixels(2, seed=4)
    with torch.no_grad():
        ours = model.get_image_features(pix)
    ref = reference_image_embeds(model, pix)
    assert ours.shape == (2, model.config.num_image_tokens, TXT_H)
    assert model.config.num_image_tokens == (8 if variant == "vicuna0" else 4)  # 4x4 patches / 4
    assert rel_err(ours, ref) <= 1e-5


def test_ln_vision_uses_eps_1e5():
    model = make_model("vicuna0")
    assert model.vision_model.post_layernorm.eps == 1e-5
    assert model.vision_model.layers[0].input_layernorm.eps == 1e-6


def test_merge4_concatenates_row_major_runs_of_four():
    """4x4 patch grid (56 px): merged token k = patches 4k..4k+3 of the row-major grid, i.e. grid row k
    (a 1x4 run), not a 2x2 block."""
    model = make_model("llama2", seed=5)
    with torch.no_grad():
        model.llama_proj.weight.zero_()
        model.llama_proj.bias.zero_()
    captured = {}
    model.llama_proj.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    pix = pixels(1, seed=6)
    with torch.no_grad():
        model.get_image_features(pix)
        tower = model.vision_model(pix).last_hidden_state[0, 1:]  # (16, H): CLS dropped
    x = captured["x"][0]  # (4, 4H)
    grid = tower.view(4, 4, VIT_H)  # (row, col, H)
    for k in range(4):
        expected = torch.cat([grid[k, c] for c in range(4)])  # the k-th grid row, left to right
        torch.testing.assert_close(x[k], expected, rtol=0, atol=0)
    block = torch.cat([grid[0, 0], grid[0, 1], grid[1, 0], grid[1, 1]])
    assert not torch.allclose(x[0], block)


def _prompt_segments(tokenizer, variant, query, n_images=1):
    """Segments as the original tokenizes them: split at <ImageHere>, BOS only on the first."""
    prompt = build_minigpt4_prompt(variant, query)
    return [([tokenizer.bos_token_id] if i == 0 else []) + legacy_encode(tokenizer, s)
            for i, s in enumerate(prompt.split(IMAGE_HERE))]


@pytest.mark.parametrize("variant", ["vicuna0", "llama2", "minigptv2"])
def test_whole_model_matches_spliced_original_forward(variant, llama_tokenizer):
    kw = {"image_size": 56}
    model = make_model(variant, seed=7, **kw)
    pix = pixels(1, seed=8)
    ids = build_minigpt4_inputs(llama_tokenizer, variant, "what is this", num_image_tokens=model.config.num_image_tokens,
                                image_token_id=IMAGE_ID)
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids]), pixel_values=pix).logits
    segments = _prompt_segments(llama_tokenizer, variant, "what is this")
    ref = reference_logits(model, segments, pix)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= 1e-4


def test_placeholder_count_mismatch_raises():
    model = make_model("vicuna0")
    ids = torch.tensor([[1, 5] + [IMAGE_ID] * 7 + [6]])
    with pytest.raises(ValueError, match="image placeholders"):
        model(input_ids=ids, pixel_values=pixels(1))
    with pytest.raises(ValueError, match="image placeholders"):
        model.generate(input_ids=torch.tensor([[1, 5] + [IMAGE_ID] * 8]), max_new_tokens=1)


def _prompt_ids(model, seed, n_text=5):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, VOCAB, (n_text,), generator=g).tolist()
    return [1] + text[:2] + [IMAGE_ID] * model.config.num_image_tokens + text[2:]


@pytest.mark.parametrize("variant", ["vicuna0", "llama2"])
def test_cached_generation_equals_full_forward(variant):
    model = make_model(variant, seed=11)
    pix = pixels(1, seed=12)
    ids = torch.tensor([_prompt_ids(model, 13)])
    out = model.generate(input_ids=ids, pixel_values=pix, max_new_tokens=6, do_sample=False, min_length=0,
                         eos_token_id=None, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            logits = model(input_ids=seq, pixel_values=pix, use_cache=False).logits[:, -1]
            top2 = logits.topk(2).values[0]
            assert (top2[0] - top2[1]).item() > 1e-3  # a clear argmax, so token equality is meaningful
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_ragged_batch_equals_singles():
    model = make_model("vicuna0", seed=21)
    rows = [_prompt_ids(model, 22, n_text=9), _prompt_ids(model, 23, n_text=3), [1, 7, 9, 11]]
    pix = pixels(2, seed=24)
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    kw = dict(max_new_tokens=4, do_sample=False, min_length=0, eos_token_id=None, pad_token_id=0)
    batch = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, **kw)[:, width:]
    with torch.no_grad():
        batch_logits = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
    for b, row in enumerate(rows):
        pv = pix[b:b + 1] if b < 2 else None
        single = model.generate(input_ids=torch.tensor([row]), pixel_values=pv, **kw)[:, len(row):]
        assert torch.equal(batch[b], single[0]), b
        with torch.no_grad():
            single_logits = model(input_ids=torch.tensor([row]), pixel_values=pv).logits
        assert rel_err(batch_logits[b, width - len(row):], single_logits[0]) <= 1e-4


def test_decode_steps_do_not_reencode_the_image():
    model = make_model("llama2", seed=31)
    calls = []
    model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.tensor([_prompt_ids(model, 32)])
    model.generate(input_ids=ids, pixel_values=pixels(1), max_new_tokens=4, do_sample=False, min_length=0,
                   eos_token_id=None, pad_token_id=0)
    assert len(calls) == 1


# --- prompts, tokenization, chat ---------------------------------------------------------------------------


def test_prompt_templates():
    sys_ = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide "
            "it to you. Please answer my questions.")
    assert build_minigpt4_prompt("vicuna0", "q?") == sys_ + "###Human: <Img><ImageHere></Img> q?###Assistant: "
    assert build_minigpt4_prompt("llama2", "q?") == sys_ + "<s>[INST] <Img><ImageHere></Img> q? [/INST] "
    assert build_minigpt4_prompt("minigptv2", "q?") == "<s>[INST] <Img><ImageHere></Img> q? [/INST]"
    two = build_minigpt4_prompt("llama2", "q2", history=[("q1", "a1")])
    assert two == sys_ + "<s>[INST] <Img><ImageHere></Img> q1 [/INST] a1<s>[INST] q2 [/INST] "
    v0 = build_minigpt4_prompt("vicuna0", "q2", history=[("q1", "a1")])
    assert v0.endswith("###Human: <Img><ImageHere></Img> q1###Assistant: a1###Human: q2###Assistant: ")


def test_segments_use_legacy_sentencepiece_ids(llama_tokenizer, llama_spm):
    """Each segment = SentencePiece's own encoding of every stretch between literal <s> (dummy prefix each),
    with the <s> as id 1: what the slow legacy tokenizer produced. transformers 5's LlamaTokenizer default
    (legacy=False) differs there; MiniGPT4Tokenizer defaults to legacy=True, so one call agrees (what vLLM uses)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=llama_spm)
    text = "the cat.<s>[INST] what is this [/INST] "
    expected = sp.encode("the cat.") + [1] + sp.encode("[INST] what is this [/INST] ")
    assert legacy_encode(llama_tokenizer, text) == expected
    assert llama_tokenizer.encode(text, add_special_tokens=False) == expected
    assert llama_tokenizer.legacy
    from transformers.convert_slow_tokenizer import generate_merges

    from modeling_visualglm.compat import llama_tokenizer_class

    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {piece: sp.get_score(i) for piece, i in vocab.items()}
    merges = generate_merges(vocab, scores, skip_tokens={"<unk>", "<s>", "</s>"})
    modern = llama_tokenizer_class()(vocab=vocab, merges=merges, legacy=False)
    assert modern.encode(text, add_special_tokens=False) != expected  # the v5 default the builders avoid
    prompt_ids = build_minigpt4_inputs(llama_tokenizer, "llama2", "what is this", num_image_tokens=3,
                                       image_token_id=IMAGE_ID)
    seg0, seg1 = build_minigpt4_prompt("llama2", "what is this").split(IMAGE_HERE)
    parts = [[1] + sp.encode(seg0.split("<s>")[0]) + [1] + sp.encode(seg0.split("<s>")[1]), sp.encode(seg1)]
    assert prompt_ids == parts[0] + [IMAGE_ID] * 3 + parts[1]


def test_process_response():
    assert process_response("  a red box###Human: more") == "a red box"
    assert process_response("Assistant: hi there ") == "hi there"


class ForceText:
    """A logits processor that makes generation emit a fixed token sequence (then anything)."""

    def __init__(self, ids, prompt_len):
        self.ids, self.prompt_len = ids, prompt_len

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        if step < len(self.ids):
            forced = torch.full_like(scores, -float("inf"))
            forced[:, self.ids[step]] = 0.0
            return forced
        return scores


def test_chat_stops_at_hashes_for_vicuna0(llama_tokenizer, tmp_path):
    from PIL import Image

    model = make_model("vicuna0", seed=41)
    image = Image.new("RGB", (70, 50), (200, 30, 40))
    prompt_len = len(build_minigpt4_inputs(llama_tokenizer, "vicuna0", "what is this", num_image_tokens=8,
                                           image_token_id=IMAGE_ID))
    script = llama_tokenizer.encode("a red box###Human: more text here", add_special_tokens=False)
    seen = []

    class Record:
        def __call__(self, input_ids, scores):
            seen.append(input_ids.shape[1])
            return scores

    resp, hist = model.chat(llama_tokenizer, image, "what is this", do_sample=False, max_new_tokens=40,
                            logits_processor=[ForceText(script, prompt_len), Record()])
    assert resp == "a red box"
    assert hist == [("what is this", "a red box")]
    hashes_end = len(llama_tokenizer.encode("a red box###", add_special_tokens=False))
    assert max(seen) - prompt_len < hashes_end + 1  # stopped right after "###", long before 40 tokens
    streamed = list(model.stream_chat(llama_tokenizer, image, "what is this", do_sample=False, max_new_tokens=40,
                                      logits_processor=[ForceText(script, prompt_len)]))
    assert streamed[-1][0] == "a red box"


def test_chat_minigptv2_stops_at_eos_not_hashes(llama_tokenizer):
    from PIL import Image

    model = make_model("minigptv2", seed=43)
    image = Image.new("RGB", (40, 60), (10, 200, 40))
    prompt_len = len(build_minigpt4_inputs(llama_tokenizer, "minigptv2", "hi", num_image_tokens=4,
                                           image_token_id=IMAGE_ID))
    words = llama_tokenizer.encode("the dog###red", add_special_tokens=False)
    script = words + [llama_tokenizer.eos_token_id] + llama_tokenizer.encode("more", add_special_tokens=False)
    resp, _ = model.chat(llama_tokenizer, image, "hi", do_sample=False, max_new_tokens=30,
                         logits_processor=[ForceText(script, prompt_len)])
    # v2 does not stop on "###" (only </s>); post-processing still cuts the text at "###"
    assert resp == "the dog"
    text_only, _ = model.chat(llama_tokenizer, None, "hi", do_sample=False, max_new_tokens=3)
    assert isinstance(text_only, str)


def test_config_rejects_bad_variants():
    with pytest.raises(ValueError, match="variant"):
        MiniGPT4Config(variant="vicuna1")
    with pytest.raises(ValueError, match="no Q-Former"):
        MiniGPT4Config(variant="llama2", qformer_config={})
    cfg = tiny_config("minigptv2", image_size=112)
    assert cfg.num_image_tokens == 16 and cfg.projector_in_features == 4 * VIT_H
    cfg2 = MiniGPT4Config.from_dict(cfg.to_dict())
    assert cfg2.variant == "minigptv2" and cfg2.qformer_config is None and cfg2.num_image_tokens == 16


def test_static_cache_decode_step_compiles_without_graph_breaks():
    """The per-token path has no host sync or data-dependent branch: dynamo captures it as one graph (the
    decode path is the same for every variant: no pixel_values)."""
    from transformers import StaticCache

    model = make_model("vicuna0", seed=41)
    ids = torch.tensor([_prompt_ids(model, 42)])
    max_len = ids.shape[1] + 8
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels(1, seed=43), cache=cache)
        nxt = out.logits[:, -1:].argmax(-1)
        pos = torch.tensor([[ids.shape[1]]])
        mask = torch.ones(1, max_len, dtype=torch.long)
        mask[:, ids.shape[1] + 1:] = 0  # the static cache's unused slots

        def step(input_ids, position_ids, attention_mask):
            return model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         cache=cache, logits_to_keep=1).logits

        explained = torch._dynamo.explain(step)(nxt, pos, mask)
        # the step is a real cached decode: rewriting the same slot gives the full forward's last logits
        decoded = step(nxt, pos, mask)[:, -1]
        full = model(input_ids=torch.cat([ids, nxt], dim=1), pixel_values=pixels(1, seed=43)).logits[:, -1]
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert rel_err(decoded, full) <= 1e-4


def test_one_call_over_a_rendered_prompt_gives_the_processor_ids(llama_tokenizer):
    """What servers that tokenize the chat template themselves (vLLM) rely on: ``<ImageHere>`` is the placeholder
    id, the text after it gets the legacy ``▁``, the template's leading BOS is the BOS; the processor reports the
    marker's expansion. ``chat`` still never samples the placeholder, which the tokenizer now counts."""
    from PIL import Image

    from modeling_visualglm.image_processing_visualglm import VisualGLMImageProcessor
    from modeling_visualglm.processing_minigpt4 import MiniGPT4Processor

    assert llama_tokenizer.convert_tokens_to_ids(IMAGE_HERE) == IMAGE_ID and len(llama_tokenizer) == IMAGE_ID + 1
    for variant in ("vicuna0", "llama2", "minigptv2"):
        processor = MiniGPT4Processor(VisualGLMImageProcessor(size=56), llama_tokenizer, num_image_tokens=3,
                                      variant=variant)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert text.startswith("<s>") and text.count(IMAGE_HERE) == 1
        out = processor(text=text, images=[Image.new("RGB", (56, 56), "red")], return_text_replacement_offsets=True)
        (offset,) = out["text_replacement_offsets"][0]
        assert offset["type"] == "image" and offset["replacement"] == IMAGE_HERE * 3
        expanded = text.replace(IMAGE_HERE, offset["replacement"])
        assert llama_tokenizer.encode(expanded, add_special_tokens=False) == out["input_ids"][0].tolist(), variant
        assert processor._get_num_multimodal_tokens(image_sizes=[(56, 56), (9, 9)]) == {
            "num_image_tokens": [3, 3], "num_image_patches": [1, 1]}
    (bound,) = make_model()._chat_logits_processors(llama_tokenizer)
    assert bound.num_decodable == IMAGE_ID
