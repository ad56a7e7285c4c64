"""VisualGLM-6B sources: the SwissArmyTransformer (SAT) release and THUDM's HF ``visualglm-6b`` folder.

Both store the same tensors under two naming schemes (spec §4.2): SAT keeps the image encoder under
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

import json
from pathlib import Path

from hub_export.families import VISUALGLM

from ..errors import ConversionError
from ..rules import convert, drop, rename
from ..sources import sharded_torch_source, torch_file_source
from .base import Format, Loaded, existing_dir

TOKENIZER_FILE = "ice_text.model"


# --- rule tables ------------------------------------------------------------------------------------------

def image_encoder_rules(prefix: str) -> list:
    """EVA ViT-g, Q-Former and glm_proj under ``prefix`` (SAT ``mixins.eva.model.``, HF ``image_encoder.``)."""
    vit, qf = prefix + "vit.", prefix + "qformer."
    return [
        rename(vit + "mixins.patch_embedding.proj.{wb}", "vision_model.embeddings.patch_embedding.{wb}"),
        # SAT's ViT is a BaseModel with a one-row vocabulary: its "word embedding" is the CLS token
        rename(vit + "transformer.word_embeddings.weight", "vision_model.embeddings.cls_embedding"),
        rename(vit + "transformer.position_embeddings.weight", "vision_model.embeddings.position_embedding"),
        rename(vit + "transformer.layers.{i}.{ln:input_layernorm|post_attention_layernorm}.{wb}",
               "vision_model.layers.{i}.{ln}.{wb}"),
        rename(vit + "transformer.layers.{i}.attention.{lin:query_key_value|dense}.{wb}",
               "vision_model.layers.{i}.attention.{lin}.{wb}"),
        rename(vit + "transformer.layers.{i}.mlp.{fc:dense_h_to_4h|dense_4h_to_h}.{wb}",
               "vision_model.layers.{i}.mlp.{fc}.{wb}"),
        # BLIP-2's ln_vision, attached to SAT's ViT as the "cls" mixin (LNFinalyMixin in model/blip2.py)
        rename(vit + "mixins.cls.ln_vision.{wb}", "vision_model.post_layernorm.{wb}"),
        # the Q-Former's 32-row vocabulary looked up with ids 0..31 = the learned query tokens
        rename(qf + "transformer.word_embeddings.weight", "qformer.query_tokens"),
        rename(qf + "transformer.layers.{i}.{ln:input_layernorm|post_attention_layernorm|post_cross_attention_layernorm}.{wb}",
               "qformer.layers.{i}.{ln}.{wb}"),
        rename(qf + "transformer.layers.{i}.attention.{lin:query_key_value|dense}.{wb}",
               "qformer.layers.{i}.attention.{lin}.{wb}"),
        rename(qf + "transformer.layers.{i}.cross_attention.{lin:query|key_value|dense}.{wb}",
               "qformer.layers.{i}.cross_attention.{lin}.{wb}"),
        rename(qf + "transformer.layers.{i}.mlp.{fc:dense_h_to_4h|dense_4h_to_h}.{wb}",
               "qformer.layers.{i}.mlp.{fc}.{wb}"),
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

def _get(args: dict, key: str, where: str, problems: list, default=None, required=True):
    if key in args and args[key] is not None:
        return args[key]
    if required and default is None:
        problems.append(f"{where} has no {key!r}")
    return default


def _vision_config(eva: dict, where: str, problems: list) -> dict:
    hidden = _get(eva, "hidden_size", where, problems)
    size = _get(eva, "image_size", where, problems, default=[224, 224])
    if isinstance(size, int):
        size = [size, size]
    if len(size) != 2 or size[0] != size[1]:
        problems.append(f"{where}: image_size {size} is not square; only square inputs are supported")
    checks = {"layernorm_order": "pre", "use_final_layernorm": False, "pre_len": 1, "post_len": 0}
    for key, want in checks.items():
        if key in eva and eva[key] != want:
            problems.append(f"{where}: {key}={eva[key]!r} is not BLIP-2's EVA ViT ({want!r}); unsupported")
    _head_dim_check(eva, where, problems)
    return dict(
        image_size=int(size[0]),
        patch_size=_get(eva, "patch_size", where, problems, default=14),
        num_channels=eva.get("in_channels", 3),
        hidden_size=hidden,
        intermediate_size=eva.get("inner_hidden_size") or 4 * (hidden or 0),
        num_hidden_layers=_get(eva, "num_layers", where, problems),
        num_attention_heads=_get(eva, "num_attention_heads", where, problems),
        # SAT's BaseTransformer default eps is 1e-5; BLIP-2's ViT-g sets 1e-6 in model_config.json
        layer_norm_eps=eva.get("layernorm_epsilon", 1e-5),
        use_post_layernorm=True,
        post_layernorm_eps=1e-5,  # nn.LayerNorm default of LNFinalyMixin.ln_vision
    )


def _cross_attention_frequency(is_decoder, num_layers: int, where: str, problems: list) -> int:
    if isinstance(is_decoder, bool) or is_decoder is None:
        if not is_decoder:
            problems.append(f"{where}: is_decoder is false: a Q-Former needs cross-attention layers")
        return 1
    if len(is_decoder) != num_layers:
        problems.append(f"{where}: is_decoder has {len(is_decoder)} entries for {num_layers} layers")
        return 2
    layers = [i for i, x in enumerate(is_decoder) if x]
    freq = layers[1] - layers[0] if len(layers) > 1 else num_layers
    if not layers or layers != list(range(0, num_layers, freq)):
        problems.append(f"{where}: cross-attention in layers {layers}; only every k-th layer from 0 is supported")
    return freq


def _qformer_config(qf: dict, where: str, problems: list) -> dict:
    hidden = _get(qf, "hidden_size", where, problems)
    layers = _get(qf, "num_layers", where, problems)
    if qf.get("layernorm_order", "post") != "post":
        problems.append(f"{where}: layernorm_order={qf['layernorm_order']!r}; the Q-Former is post-LN")
    _head_dim_check(qf, where, problems)
    return dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=_get(qf, "num_attention_heads", where, problems),
        intermediate_size=qf.get("inner_hidden_size") or 4 * (hidden or 0),
        layer_norm_eps=qf.get("layernorm_epsilon", 1e-5),
        num_query_tokens=_get(qf, "vocab_size", where, problems),
        cross_attention_frequency=_cross_attention_frequency(qf.get("is_decoder"), layers or 0, where, problems),
    )


def _head_dim_check(args: dict, where: str, problems: list):
    hd = args.get("hidden_size_per_attention_head")
    if hd is not None and args.get("hidden_size") and args.get("num_attention_heads"):
        if hd * args["num_attention_heads"] != args["hidden_size"]:
            problems.append(f"{where}: hidden_size_per_attention_head={hd} x heads != hidden_size; unsupported")


TOKEN_KEYS = {  # config key → tokenizer attribute
    "bos_token_id": "sop_token_id",
    "eos_token_id": "eop_token_id",
    "pad_token_id": "pad_token_id",
    "mask_token_id": "mask_token_id",
    "gmask_token_id": "gmask_token_id",
}
TOKEN_DEFAULTS = {"bos_token_id": 130004, "eos_token_id": 130005, "pad_token_id": 3, "mask_token_id": 130000,
                  "gmask_token_id": 130001}


def visualglm_config(glm: dict, eva: dict, qformer: dict, *, where: str, tokenizer, rope_fp16_inv_freq: bool,
                     image_length=None):
    """``VisualGLMConfig`` from SAT-style arguments (SAT ``model_config.json`` or THUDM's ``config.json``)."""
    from modeling_visualglm.configuration_visualglm import VisualGLMConfig

    problems: list[str] = []
    hidden = _get(glm, "hidden_size", where, problems)
    if glm.get("layernorm_order", "post") != "post":
        problems.append(f"{where}: layernorm_order={glm['layernorm_order']!r}; ChatGLM-6B is post-LN")
    if glm.get("position_encoding_2d", True) is not True:
        problems.append(f"{where}: position_encoding_2d is false; only ChatGLM's 2D rotary is supported")
    _head_dim_check(glm, where, problems)
    text = dict(
        vocab_size=_get(glm, "vocab_size", where, problems),
        hidden_size=hidden,
        num_hidden_layers=_get(glm, "num_layers", where, problems),
        num_attention_heads=_get(glm, "num_attention_heads", where, problems),
        intermediate_size=glm.get("inner_hidden_size") or 4 * (hidden or 0),
        max_position_embeddings=glm.get("max_sequence_length", 2048),
        layer_norm_eps=glm.get("layernorm_epsilon", 1e-5),
        rope_fp16_inv_freq=rope_fp16_inv_freq,
    )
    for key, attr in TOKEN_KEYS.items():
        from_cfg = glm.get(key)
        from_tok = getattr(tokenizer, attr) if tokenizer is not None else None
        if from_cfg is not None and from_tok is not None and from_cfg != from_tok:
            problems.append(f"{where}: {key}={from_cfg} but the tokenizer's id is {from_tok} (wrong tokenizer?)")
        text[key] = from_cfg if from_cfg is not None else from_tok if from_tok is not None else TOKEN_DEFAULTS[key]
    if tokenizer is not None and text["vocab_size"] and tokenizer.sp_model.GetPieceSize() > text["vocab_size"]:
        problems.append(f"the tokenizer has {tokenizer.sp_model.GetPieceSize()} pieces but the model only "
                        f"{text['vocab_size']} embedding rows (wrong tokenizer?)")
    vision = _vision_config(eva, f"{where} (vision)", problems)
    qf = _qformer_config(qformer, f"{where} (Q-Former)", problems)
    cross = qformer.get("cross_attn_hidden_size")
    if cross is not None and vision["hidden_size"] and cross != vision["hidden_size"]:
        problems.append(f"{where}: Q-Former cross_attn_hidden_size {cross} != ViT hidden_size {vision['hidden_size']}")
    if image_length is not None and qf["num_query_tokens"] and image_length != qf["num_query_tokens"]:
        problems.append(f"{where}: image_length {image_length} != the Q-Former's {qf['num_query_tokens']} queries")
    if problems:
        raise ConversionError(problems, header=f"cannot build a VisualGLM config from {where}")
    return VisualGLMConfig(
        vision_config=vision,
        qformer_config=qf,
        text_config=text,
        image_token_id=tokenizer.image_token_id if tokenizer is not None else None,
        tie_word_embeddings=True,
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


# --- tokenizer -------------------------------------------------------------------------------------------

def find_tokenizer_file(explicit: str | None, fallback_dirs: list[Path]) -> Path | None:
    """``--tokenizer`` (``ice_text.model`` or a folder holding it) or the first fallback folder that has one."""
    if explicit is not None:
        path = Path(explicit)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise ConversionError(f"--tokenizer {explicit}: no {TOKENIZER_FILE} there")
        return path
    for d in fallback_dirs:
        if (d / TOKENIZER_FILE).is_file():
            return d / TOKENIZER_FILE
    return None


def load_tokenizer(vocab_file: Path | None):
    if vocab_file is None:
        return None
    from modeling_visualglm.tokenization_chatglm import ChatGLMTokenizer

    cfg_path = vocab_file.parent / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            n_image = json.loads(cfg_path.read_text()).get("num_image_tokens", 0)
        except ValueError:
            n_image = 0
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
    optional_flags = {"qkv_layout": "blocked"}

    def load(self, args) -> Loaded:
        src = existing_dir(args.src, "--src")
        latest = src / "latest"
        if not latest.is_file():
            raise ConversionError(f"{src}: no 'latest' file: not a SAT checkpoint folder "
                                  "(expected latest, <iter>/mp_rank_00_model_states.pt, model_config.json)")
        tag = latest.read_text().strip()
        if not (tag.isdigit() or tag == "release"):
            raise ConversionError(f"{latest}: expected an iteration number or 'release', found {tag[:40]!r}")
        args_json = _read_json(src / "model_config.json")
        mp = args_json.get("model_parallel_size", 1)
        if mp != 1:
            raise ConversionError(f"{src}: model_parallel_size={mp}; merge the model-parallel ranks first "
                                  "(only mp_rank_00 checkpoints are supported)")
        model_class = args_json.get("model_class", "VisualGLMModel")
        if "VisualGLM" not in model_class:
            raise ConversionError(f"{src}/model_config.json: model_class {model_class!r} is not a VisualGLM model")
        if "eva_args" not in args_json or "qformer_args" not in args_json:
            raise ConversionError(f"{src}/model_config.json has no eva_args/qformer_args: not VisualGLM")
        ckpt = src / tag / "mp_rank_00_model_states.pt"
        tokenizer = load_tokenizer(find_tokenizer_file(args.tokenizer, [src]))
        config = visualglm_config(args_json, args_json["eva_args"], args_json["qformer_args"],
                                  where=f"{src}/model_config.json", tokenizer=tokenizer,
                                  rope_fp16_inv_freq=False, image_length=args_json.get("image_length"))
        source = torch_file_source(ckpt, subkey="module")
        adapters = sorted({k.split(".matrix_")[0] for k in source.keys() if ".matrix_A." in k or ".matrix_B." in k})
        if adapters or any(k.startswith("mixins.ptuning.") for k in source.keys()):
            raise ConversionError(
                f"{ckpt} is a fine-tuning checkpoint with unmerged "
                + (f"LoRA adapters ({len(adapters)} layers, e.g. {adapters[0]})" if adapters else "P-tuning prefixes")
                + ": merge them into the base weights first (SAT: model.get_mixin('lora').merge_lora(), then "
                "save_checkpoint); P-tuning prefixes cannot be merged and are not supported")
        rules = sat_rules(args.qkv_layout, config.text_config.num_attention_heads)
        notes = [
            f"SAT checkpoint {ckpt} (iteration {tag}, model_class {model_class})",
            f"ChatGLM qkv read as {args.qkv_layout}"
            + (" and interleaved per head" if args.qkv_layout == "blocked" else " (renamed only)"),
            "rotary inv_freq exact in fp32 (rope_fp16_inv_freq=False), as SwissArmyTransformer 0.4.12 computes it",
        ]
        return _loaded(source, rules, config, tokenizer, notes)


class HfVisualGLM(Format):
    name = "hf-visualglm"
    help = "THUDM/visualglm-6b Hugging Face folder (config.json, pytorch_model-*.bin + index, ice_text.model)"
    required_flags = ("src",)

    def load(self, args) -> Loaded:
        src = existing_dir(args.src, "--src")
        cfg = _read_json(src / "config.json")
        if "eva_config" not in cfg or "qformer_config" not in cfg:
            raise ConversionError(f"{src}/config.json has no eva_config/qformer_config: not a visualglm-6b folder")
        tokenizer = load_tokenizer(find_tokenizer_file(args.tokenizer, [src]))
        config = visualglm_config(cfg, cfg["eva_config"], cfg["qformer_config"], where=f"{src}/config.json",
                                  tokenizer=tokenizer, rope_fp16_inv_freq=True, image_length=cfg.get("image_length"))
        source = sharded_torch_source(src, "pytorch_model.bin.index.json", "pytorch_model.bin")
        notes = [
            f"THUDM HF folder {src} ({len(source)} tensors)",
            "ChatGLM qkv is head-interleaved already (renamed only)",
            "rotary inv_freq rounded to fp16 (rope_fp16_inv_freq=True), as THUDM's modeling_chatglm.py does",
        ]
        return _loaded(source, hf_rules(config.text_config.num_attention_heads), config, tokenizer, notes)
