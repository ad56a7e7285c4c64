"""VisualGLM-6B sources: the SwissArmyTransformer (SAT) release and THUDM's HF ``visualglm-6b`` folder.

Both store the same tensors under two naming schemes: SAT keeps the image encoder under
``mixins.eva.model.`` and the LM head under ``mixins.chatglm-final.lm_head``; THUDM's HF conversion
(``convert_sat_checkpoint.py`` on the ``visual`` branch of THUDM/chatglm-6b) renamed the prefix to
``image_encoder.``, the head to ``lm_head`` and deleted ``transformer.position_embeddings``. Our names
(docs/architecture.md) were chosen so that both convert by renaming, except ChatGLM's fused qkv:

- SAT ≥ cf2cb8a (2023-07-12; the re-exported "new" visualglm-6b.zip) splits qkv as blocked
  [Q all heads; K; V] (``split_tensor_along_last_dim(…, 3)`` in sat/model/official/chatglm_model.py);
- THUDM-HF, the May-2023 SAT release and our ``ChatGLMModel`` use head-interleaved rows
  [h0: q,k,v; h1: q,k,v; …].

``--qkv-layout`` (default ``blocked``) says which one a SAT checkpoint has; ``hf-visualglm`` is always
interleaved. The ViT / Q-Former fused qkv and cross-attention ``key_value`` are blocked everywhere and so in
our blocks too: they are renamed only.
"""

from __future__ import annotations

from pathlib import Path

from ...hub_export.families import VISUALGLM

from ..errors import ConversionError
from ..rules import convert, drop, rename
from ..lora import adapter_dir, attach_sat_lora
from ..sources import closed_on_error, find_tokenizer, open_sat_folder, read_json_object, sharded_torch_source, torch_file_source
from ..validate import MAX_IMAGE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, Fields, build_config, is_int, raise_if
from .base import Format, Loaded, existing_dir

TOKENIZER_FILE = "ice_text.model"


# --- rule tables ------------------------------------------------------------------------------------------

def _sat_layer_rules(src: str, dst: str, layernorms: str, linears: dict[str, str]) -> list:
    """SAT ``BaseTransformer`` layers under ``src`` (``….transformer.layers.``) → ours under ``dst`` (``….layers.``):
    same names below the layer number. ``linears``: sub-module → its linear layers (``attention``: ``query_key_value|dense``)."""
    rules = [rename(src + "{i}.{ln:" + layernorms + "}.{wb}", dst + "{i}.{ln}.{wb}")]
    rules += [rename(src + "{i}." + module + ".{lin:" + names + "}.{wb}", dst + "{i}." + module + ".{lin}.{wb}")
              for module, names in linears.items()]
    return rules


def image_encoder_rules(prefix: str) -> list:
    """EVA ViT-g, Q-Former and glm_proj under ``prefix`` (SAT ``mixins.eva.model.``, HF ``image_encoder.``)."""
    vit, qf = prefix + "vit.", prefix + "qformer."
    attention, mlp = {"attention": "query_key_value|dense"}, {"mlp": "dense_h_to_4h|dense_4h_to_h"}
    return [
        rename(vit + "mixins.patch_embedding.proj.{wb}", "vision_model.embeddings.patch_embedding.{wb}"),
        # SAT's ViT is a BaseModel with a one-row vocabulary: its "word embedding" is the CLS token
        rename(vit + "transformer.word_embeddings.weight", "vision_model.embeddings.cls_embedding"),
        rename(vit + "transformer.position_embeddings.weight", "vision_model.embeddings.position_embedding"),
        *_sat_layer_rules(vit + "transformer.layers.", "vision_model.layers.",
                          "input_layernorm|post_attention_layernorm", {**attention, **mlp}),
        # BLIP-2's ln_vision, attached to SAT's ViT as the "cls" mixin (LNFinalyMixin in model/blip2.py)
        rename(vit + "mixins.cls.ln_vision.{wb}", "vision_model.post_layernorm.{wb}"),
        # the Q-Former's 32-row vocabulary looked up with ids 0..31 = the learned query tokens
        rename(qf + "transformer.word_embeddings.weight", "qformer.query_tokens"),
        *_sat_layer_rules(qf + "transformer.layers.", "qformer.layers.",
                          "input_layernorm|post_attention_layernorm|post_cross_attention_layernorm",
                          {**attention, "cross_attention": "query|key_value|dense", **mlp}),
        rename(qf + "transformer.final_layernorm.{wb}", "qformer.final_layernorm.{wb}"),
        rename(prefix + "glm_proj.{wb}", "glm_proj.{wb}"),
    ]


def chatglm_rules(qkv_layout: str, num_heads: int) -> list:
    """ChatGLM-6B's ``transformer.*`` (same names in SAT and THUDM-HF)."""
    qkv_src = "transformer.layers.{i}.attention.query_key_value.{wb}"
    qkv_dst = "language_model.layers.{i}.attention.query_key_value.{wb}"
    if qkv_layout == "blocked":
        qkv = convert(qkv_src, qkv_dst, "interleave_qkv_heads", num_heads=num_heads)
    elif qkv_layout == "interleaved":
        qkv = rename(qkv_src, qkv_dst)
    else:
        raise ValueError(f"qkv layout must be blocked or interleaved, not {qkv_layout!r}")
    return [
        rename("transformer.word_embeddings.weight", "language_model.word_embeddings.weight"),
        rename("transformer.layers.{i}.{ln:input_layernorm|post_attention_layernorm}.{wb}",
               "language_model.layers.{i}.{ln}.{wb}"),
        qkv,
        rename("transformer.layers.{i}.attention.dense.{wb}", "language_model.layers.{i}.attention.dense.{wb}"),
        rename("transformer.layers.{i}.mlp.{fc:dense_h_to_4h|dense_4h_to_h}.{wb}",
               "language_model.layers.{i}.mlp.{fc}.{wb}"),
        rename("transformer.final_layernorm.{wb}", "language_model.final_layernorm.{wb}"),
    ]


def sat_rules(qkv_layout: str, num_heads: int) -> list:
    return image_encoder_rules("mixins.eva.model.") + chatglm_rules(qkv_layout, num_heads) + [
        # SAT keeps the head as a separate tensor; the applier ties it back if it equals the embeddings
        rename("mixins.chatglm-final.lm_head.weight", "lm_head.weight"),
        drop("transformer.position_embeddings.weight",
             "SAT's BaseModel allocates absolute positions; ChatGLM never reads them (2D rotary instead)"),
        drop("mixins.chatglm-attn.rotary_emb.inv_freq",
             "rotary frequencies are a persistent SAT buffer; our model recomputes them from the config"),
    ]


def hf_rules(num_heads: int) -> list:
    return image_encoder_rules("image_encoder.") + chatglm_rules("interleaved", num_heads) + [
        rename("lm_head.weight", "lm_head.weight"),
        drop("transformer.layers.{i}.attention.rotary_emb.inv_freq",
             "rotary frequencies are a buffer of THUDM's code; our model recomputes them from the config"),
    ]


# --- config ----------------------------------------------------------------------------------------------

def _vision_config(eva: Fields) -> dict:
    """BLIP-2's EVA ViT-g from SAT's ``eva_args`` (THUDM-HF: ``eva_config``), checked."""
    hidden = eva.int("hidden_size", max=MAX_WIDTH)
    heads = eva.int("num_attention_heads", max=MAX_WIDTH)
    size = eva.image_size(default=224)
    patch = eva.int("patch_size", default=14, max=MAX_IMAGE)
    checks = {"layernorm_order": "pre", "use_final_layernorm": False, "pre_len": 1, "post_len": 0}
    for key, want in checks.items():
        if key in eva.data and eva.data[key] != want:
            eva.problems.append(f"{eva.where}: {key}={eva.data[key]!r} is not BLIP-2's EVA ViT ({want!r}); unsupported")
    eva.divisible("hidden_size", hidden, "num_attention_heads", heads)
    eva.divisible("image_size", size, "patch_size", patch)
    _head_dim_check(eva, hidden, heads)
    return dict(
        image_size=size,
        patch_size=patch,
        num_channels=eva.int("in_channels", default=3, max=64),
        hidden_size=hidden,
        intermediate_size=eva.int("inner_hidden_size", default=4 * (hidden or 0) or None, max=MAX_WIDTH),
        num_hidden_layers=eva.int("num_layers", max=MAX_LAYERS),
        num_attention_heads=heads,
        # SAT's BaseTransformer default eps is 1e-5; BLIP-2's ViT-g sets 1e-6 in model_config.json
        layer_norm_eps=eva.number("layernorm_epsilon", default=1e-5, max=1.0),
        use_post_layernorm=True,
        post_layernorm_eps=1e-5,  # nn.LayerNorm default of LNFinalyMixin.ln_vision
    )


def _cross_attention_frequency(qf: Fields, num_layers: int | None) -> int:
    is_decoder = qf.bool_list("is_decoder")
    if not isinstance(is_decoder, list):
        # SAT's default is False; a wrongly typed value was reported by bool_list already
        if not is_decoder and isinstance(qf.data.get("is_decoder"), (bool, type(None))):
            qf.problems.append(f"{qf.where}: is_decoder is false: a Q-Former needs cross-attention layers")
        return 1
    if num_layers is None:
        return 2
    if len(is_decoder) != num_layers:
        qf.problems.append(f"{qf.where}: is_decoder has {len(is_decoder)} entries for {num_layers} layers")
        return 2
    layers = [i for i, x in enumerate(is_decoder) if x]
    freq = layers[1] - layers[0] if len(layers) > 1 else num_layers
    if not layers or layers != list(range(0, num_layers, freq)):
        qf.problems.append(f"{qf.where}: cross-attention in layers {layers}; only every k-th layer from 0 is supported")
        return 2
    return freq


def _qformer_config(qf: Fields) -> dict:
    hidden = qf.int("hidden_size", max=MAX_WIDTH)
    heads = qf.int("num_attention_heads", max=MAX_WIDTH)
    layers = qf.int("num_layers", max=MAX_LAYERS)
    if qf.str("layernorm_order", default="post") != "post":
        qf.problems.append(f"{qf.where}: layernorm_order={qf.data['layernorm_order']!r}; the Q-Former is post-LN")
    qf.divisible("hidden_size", hidden, "num_attention_heads", heads)
    _head_dim_check(qf, hidden, heads)
    return dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=qf.int("inner_hidden_size", default=4 * (hidden or 0) or None, max=MAX_WIDTH),
        layer_norm_eps=qf.number("layernorm_epsilon", default=1e-5, max=1.0),
        num_query_tokens=qf.int("vocab_size", max=MAX_POSITIONS),
        cross_attention_frequency=_cross_attention_frequency(qf, layers),
    )


def _head_dim_check(args: Fields, hidden, heads):
    hd = args.int("hidden_size_per_attention_head", default=0, max=MAX_WIDTH, required=False)
    if hd and is_int(hidden) and is_int(heads) and hd * heads != hidden:
        args.problems.append(f"{args.where}: hidden_size_per_attention_head={hd} x heads != hidden_size; unsupported")


TOKEN_KEYS = {  # config key → tokenizer attribute
    "bos_token_id": "sop_token_id",
    "eos_token_id": "eop_token_id",
    "pad_token_id": "pad_token_id",
    "mask_token_id": "mask_token_id",
    "gmask_token_id": "gmask_token_id",
}
TOKEN_DEFAULTS = {"bos_token_id": 130004, "eos_token_id": 130005, "pad_token_id": 3, "mask_token_id": 130000,
                  "gmask_token_id": 130001}


def _token_ids(g: Fields, tokenizer, vocab: int | None) -> dict:
    """The special-token ids: the config's, checked against the tokenizer's (else the tokenizer's, else THUDM's)."""
    ids = {}
    for key, attr in TOKEN_KEYS.items():
        from_cfg = g.int(key, required=False, min=0, max=MAX_VOCAB)
        from_tok = getattr(tokenizer, attr) if tokenizer is not None else None
        if from_cfg is not None and from_tok is not None and from_cfg != from_tok:
            g.problems.append(f"{g.where}: {key}={from_cfg} but the tokenizer's id is {from_tok} (wrong tokenizer?)")
        if from_cfg is not None and vocab is not None and from_cfg >= vocab:
            g.problems.append(f"{g.where}: {key} {from_cfg} is outside the {vocab}-row vocabulary")
        ids[key] = from_cfg if from_cfg is not None else from_tok if from_tok is not None else TOKEN_DEFAULTS[key]
    if tokenizer is not None and vocab and tokenizer.sp_model.GetPieceSize() > vocab:
        g.problems.append(f"the tokenizer has {tokenizer.sp_model.GetPieceSize()} pieces but the model only "
                          f"{vocab} embedding rows (wrong tokenizer?)")
    return ids


def visualglm_config(glm: dict, *, eva_key: str, qformer_key: str, where: str, tokenizer, rope_fp16_inv_freq: bool):
    """``VisualGLMConfig`` from SAT-style arguments (SAT ``model_config.json`` with ``eva_args`` /
    ``qformer_args``, or THUDM's ``config.json`` with ``eva_config`` / ``qformer_config``).

    Every field is type- and range-checked and the relations between fields verified first; all problems
    are reported in one ``ConversionError``.
    """
    from modeling_visualglm.configuration_visualglm import VisualGLMConfig

    problems: list[str] = []
    g = Fields(glm, where, problems)
    hidden = g.int("hidden_size", max=MAX_WIDTH)
    heads = g.int("num_attention_heads", max=MAX_WIDTH)
    vocab = g.int("vocab_size", max=MAX_VOCAB)
    if g.str("layernorm_order", default="post") != "post":
        problems.append(f"{where}: layernorm_order={glm['layernorm_order']!r}; ChatGLM-6B is post-LN")
    if g.bool("position_encoding_2d", default=True) is not True:
        problems.append(f"{where}: position_encoding_2d is false; only ChatGLM's 2D rotary is supported")
    if g.divisible("hidden_size", hidden, "num_attention_heads", heads) and hidden and heads and (hidden // heads) % 4:
        problems.append(f"{where}: head dim {hidden // heads} (hidden_size / num_attention_heads) is not a multiple "
                        "of 4: ChatGLM's 2D rotary splits each head into two rotary halves")
    _head_dim_check(g, hidden, heads)
    text = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=g.int("num_layers", max=MAX_LAYERS),
        num_attention_heads=heads,
        intermediate_size=g.int("inner_hidden_size", default=4 * (hidden or 0) or None, max=MAX_WIDTH),
        max_position_embeddings=g.int("max_sequence_length", default=2048, max=MAX_POSITIONS),
        layer_norm_eps=g.number("layernorm_epsilon", default=1e-5, max=1.0),
        rope_fp16_inv_freq=rope_fp16_inv_freq,
    )
    text.update(_token_ids(g, tokenizer, vocab))
    vision = _vision_config(g.section(eva_key))
    qf_fields = g.section(qformer_key)
    qf = _qformer_config(qf_fields)
    cross = qf_fields.int("cross_attn_hidden_size", required=False, max=MAX_WIDTH)
    if cross is not None and vision["hidden_size"] and cross != vision["hidden_size"]:
        problems.append(f"{where}: Q-Former cross_attn_hidden_size {cross} != ViT hidden_size {vision['hidden_size']}")
    image_length = g.int("image_length", required=False, max=MAX_POSITIONS)
    if image_length is not None and qf["num_query_tokens"] and image_length != qf["num_query_tokens"]:
        problems.append(f"{where}: image_length {image_length} != the Q-Former's {qf['num_query_tokens']} queries")
    raise_if(problems, f"cannot build a VisualGLM config from {where}")
    return build_config(
        VisualGLMConfig, where,
        vision_config=vision,
        qformer_config=qf,
        text_config=text,
        image_token_id=tokenizer.image_token_id if tokenizer is not None else None,
        tie_word_embeddings=True,
    )


# --- tokenizer -------------------------------------------------------------------------------------------

def load_tokenizer(explicit: str | None, src: Path):
    """ChatGLM's ice_text tokenizer from ``--tokenizer`` (the file or a folder holding it), else the source folder's;
    None when neither has one."""
    vocab_file = find_tokenizer(explicit, [src], (TOKENIZER_FILE,))
    if vocab_file is None:
        return None
    from modeling_visualglm.tokenization_chatglm import ChatGLMTokenizer

    cfg_path = vocab_file.parent / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            tok_cfg = read_json_object(cfg_path)
        except ConversionError:
            tok_cfg = {}  # the converter writes its own tokenizer_config.json; this one only flags icetk folders
        n_image = tok_cfg.get("num_image_tokens", 0)
        if n_image:
            raise ConversionError(
                f"{cfg_path}: num_image_tokens={n_image}: this is a pre-April-2023 (icetk, 150528-row) ChatGLM "
                "tokenizer; VisualGLM-6B uses the slim one (num_image_tokens 0)")
    try:
        return ChatGLMTokenizer(vocab_file=str(vocab_file))
    except (ValueError, OSError, RuntimeError) as e:
        raise ConversionError(f"{vocab_file}: not a ChatGLM ice_text SentencePiece model: {e}") from None


def _loaded(source, rules, config, tokenizer, notes):
    from modeling_visualglm.modeling_visualglm import VisualGLMForConditionalGeneration

    if tokenizer is None:
        notes.append("no tokenizer found: the folder will be marked incomplete (pass --tokenizer)")
    return Loaded(source=source, rules=rules, config=config, model_class=VisualGLMForConditionalGeneration,
                  family=VISUALGLM, tokenizer=tokenizer, notes=notes)


# --- formats ---------------------------------------------------------------------------------------------

class SatVisualGLM(Format):
    name = "sat-visualglm"
    help = ("SwissArmyTransformer VisualGLM-6B release (--src with latest, <iter>/mp_rank_00_model_states.pt, "
            "model_config.json)")
    required_flags = ("src",)
    optional_flags = {"qkv_layout": "blocked", "lora_as_adapter": None}

    def rule_table(self, config, qkv_layout: str = "blocked") -> list:
        return sat_rules(qkv_layout, config.text_config.num_attention_heads)

    def load(self, args) -> Loaded:
        sat = open_sat_folder(existing_dir(args.src, "--src"), family="VisualGLM",
                              merge_hint="only mp_rank_00 checkpoints are supported")
        if "eva_args" not in sat.args or "qformer_args" not in sat.args:
            raise ConversionError(f"{sat.where} has no eva_args/qformer_args: not VisualGLM")
        tokenizer = load_tokenizer(args.tokenizer, sat.folder)
        config = visualglm_config(sat.args, eva_key="eva_args", qformer_key="qformer_args", where=sat.where,
                                  tokenizer=tokenizer, rope_fp16_inv_freq=False)
        source = torch_file_source(sat.checkpoint, subkey="module")
        notes = [
            sat.describe(),
            f"ChatGLM qkv read as {args.qkv_layout}"
            + (" and interleaved per head" if args.qkv_layout == "blocked" else " (renamed only)"),
            "rotary inv_freq exact in fp32 (rope_fp16_inv_freq=False), as SwissArmyTransformer 0.4.12 computes it",
        ]
        with closed_on_error(source):
            loaded = _loaded(source, self.rule_table(config, args.qkv_layout), config, tokenizer, notes)
            # fine-tuned checkpoints: LoRA merged or split off as a peft adapter; P-tuning refused (conversion/lora.py)
            return attach_sat_lora(loaded, source, sat, Path(args.out), adapter_dir(args))


class HfVisualGLM(Format):
    name = "hf-visualglm"
    help = "THUDM/visualglm-6b Hugging Face folder (config.json, pytorch_model-*.bin + index, ice_text.model)"
    required_flags = ("src",)

    def rule_table(self, config) -> list:
        return hf_rules(config.text_config.num_attention_heads)

    def load(self, args) -> Loaded:
        src = existing_dir(args.src, "--src")
        cfg = read_json_object(src / "config.json")
        if "eva_config" not in cfg or "qformer_config" not in cfg:
            raise ConversionError(f"{src}/config.json has no eva_config/qformer_config: not a visualglm-6b folder")
        tokenizer = load_tokenizer(args.tokenizer, src)
        config = visualglm_config(cfg, eva_key="eva_config", qformer_key="qformer_config", where=f"{src}/config.json",
                                  tokenizer=tokenizer, rope_fp16_inv_freq=True)
        source = sharded_torch_source(src, "pytorch_model.bin.index.json", "pytorch_model.bin")
        notes = [
            f"THUDM HF folder {src} ({len(source)} tensors)",
            "ChatGLM qkv is head-interleaved already (renamed only)",
            "rotary inv_freq rounded to fp16 (rope_fp16_inv_freq=True), as THUDM's modeling_chatglm.py does",
        ]
        return _loaded(source, self.rule_table(config), config, tokenizer, notes)


# --- the reverse direction: a VisualGLM config → SAT's model_config.json --------------------------------------

def sat_model_config(config) -> dict:
    """The ``model_config.json`` SwissArmyTransformer writes for a VisualGLM model of ``config`` (the fields
    :func:`visualglm_config` reads back), for writing checkpoints in the SAT layout (the demo, tests); the weights
    go through ``conversion.apply.to_original(state_dict, "sat-visualglm", config)``."""
    v, q, t = config.vision_config, config.qformer_config, config.text_config
    return {
        "model_class": "VisualGLMModel", "tokenizer_type": "THUDM/chatglm-6b",
        "num_layers": t.num_hidden_layers, "hidden_size": t.hidden_size, "num_attention_heads": t.num_attention_heads,
        "vocab_size": t.vocab_size, "layernorm_order": "post", "model_parallel_size": 1,
        "max_sequence_length": t.max_position_embeddings, "inner_hidden_size": t.intermediate_size,
        "layernorm_epsilon": t.layer_norm_eps, "image_length": q.num_query_tokens,
        "bos_token_id": t.bos_token_id, "mask_token_id": t.mask_token_id, "gmask_token_id": t.gmask_token_id,
        "pad_token_id": t.pad_token_id,
        "eva_args": {
            "num_layers": v.num_hidden_layers, "hidden_size": v.hidden_size,
            "num_attention_heads": v.num_attention_heads, "vocab_size": 1, "layernorm_order": "pre",
            "model_parallel_size": 1, "max_sequence_length": v.num_patches + 1,
            "inner_hidden_size": v.intermediate_size, "use_final_layernorm": False,
            "layernorm_epsilon": v.layer_norm_eps, "image_size": [v.image_size, v.image_size], "pre_len": 1,
            "post_len": 0, "in_channels": v.num_channels, "num_classes": 0, "patch_size": v.patch_size,
        },
        "qformer_args": {
            "num_layers": q.num_hidden_layers, "hidden_size": q.hidden_size,
            "num_attention_heads": q.num_attention_heads, "vocab_size": q.num_query_tokens,
            "layernorm_order": "post", "model_parallel_size": 1, "max_sequence_length": 0,
            "is_decoder": [i % q.cross_attention_frequency == 0 for i in range(q.num_hidden_layers)],
            "cross_attn_hidden_size": v.hidden_size, "layernorm_epsilon": q.layer_norm_eps,
            "inner_hidden_size": q.intermediate_size,
        },
    }
