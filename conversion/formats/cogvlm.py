"""CogVLM / CogVLM2 sources: the SwissArmyTransformer (SAT) release and THUDM's HF folders.

- ``sat-cogvlm``: ``latest``, ``<iter>/mp_rank_00_model_states.pt`` (weights under ``'module'``) and
  ``model_config.json`` with ``eva_args`` (THUDM/CogVLM's ``CogVLMModel``; spec cogvlm.md §3.1).
- ``hf-cogvlm``: ``cogvlm-chat-hf`` / ``cogvlm-base-*-hf`` / ``cogvlm-grounding-*-hf`` (v1) and
  ``cogvlm2-llama3-*`` (v2) folders: ``config.json`` with ``vision_config``, safetensors or ``.bin`` shards.

Both load by renaming alone (spec cogvlm.md §3.2: every weight is [out, in] in both, fused qkv layouts equal):
no transpose, split or permutation. The version is read from the structure: a 2x2 ``conv`` before the adapter
means CogVLM2 (8 KV heads, RoPE base 500000, a bias on the vision-expert qkv only).

v1 HF folders carry no tokenizer (THUDM's demos load ``lmsys/vicuna-7b-v1.5``'s): pass ``--tokenizer`` with a
Llama tokenizer folder, or the folder is written incomplete. CogVLM2 folders ship their Llama-3 tokenizer.
The image placeholders get their own id, the text vocab size (``CogVLMConfig``'s default), not the pad id
the original code used.
"""

from __future__ import annotations

from pathlib import Path

from ...hub_export.families import COGVLM

from ..errors import ConversionError
from ..lora import adapter_dir, attach_sat_lora
from ..rules import drop, rename
from ..sources import (TOKENIZER_FILES, closed_on_error, find_tokenizer, hf_folder_source, load_tokenizer_folder,
                       open_sat_folder, read_json_object, torch_file_source)
from ..validate import MAX_IMAGE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, Fields, build_config, is_int, raise_if
from .base import Format, Loaded, existing_dir

ROPE_THETA = {"cogvlm": 10000.0, "cogvlm2": 500000.0}


# --- rule tables ------------------------------------------------------------------------------------------

def _vision_rules(emb: str, emb_names: dict[str, str], src_layers: str, mlp: tuple[str, str]) -> list:
    """EVA2-CLIP-E: the embeddings under ``emb`` (``emb_names``: the source names of the patch projection ``proj``,
    the CLS token ``cls`` and the position table ``pos``) and the layers under ``src_layers`` (``….layers.``);
    ``mlp`` = the source's (in, out) fc names."""
    fc_in, fc_out = mlp
    return [
        rename(emb + emb_names["proj"] + ".{wb}", "vision_model.embeddings.patch_embedding.{wb}"),
        rename(emb + emb_names["cls"], "vision_model.embeddings.cls_embedding"),
        rename(emb + emb_names["pos"], "vision_model.embeddings.position_embedding"),
        rename(src_layers + "{i}.{ln:input_layernorm|post_attention_layernorm}.{wb}",
               "vision_model.layers.{i}.{ln}.{wb}"),
        rename(src_layers + "{i}.attention.{lin:query_key_value|dense}.{wb}",
               "vision_model.layers.{i}.attention.{lin}.{wb}"),
        rename(src_layers + "{i}.mlp." + fc_in + ".{wb}", "vision_model.layers.{i}.mlp.dense_h_to_4h.{wb}"),
        rename(src_layers + "{i}.mlp." + fc_out + ".{wb}", "vision_model.layers.{i}.mlp.dense_4h_to_h.{wb}"),
    ]


def _adapter_rules(prefix: str) -> list:
    """GLU adapter, boi/eoi and CogVLM2's conv under ``prefix`` (SAT ``mixins.eva.``, HF ``model.vision.``)."""
    return [
        rename(prefix + "linear_proj.{lin:linear_proj|gate_proj|dense_h_to_4h|dense_4h_to_h}.weight",
               "adapter.{lin}.weight"),
        rename(prefix + "linear_proj.norm1.{wb}", "adapter.norm1.{wb}"),
        rename(prefix + "{tok:boi|eoi}", "adapter.{tok}"),
        rename(prefix + "conv.{wb}", "adapter.conv.{wb}"),
    ]


def hf_rules() -> list:
    vis = "model.vision."
    return [
        rename("model.embed_tokens.weight", "language_model.embed_tokens.weight"),
        rename("model.layers.{i}.{ln:input_layernorm|post_attention_layernorm}.weight",
               "language_model.layers.{i}.{ln}.weight"),
        rename("model.layers.{i}.self_attn.{lin:language_expert_query_key_value|language_expert_dense|"
               "vision_expert_query_key_value|vision_expert_dense}.{wb}",
               "language_model.layers.{i}.self_attn.{lin}.{wb}"),
        rename("model.layers.{i}.mlp.{expert:language_mlp|vision_mlp}.{lin:gate_proj|up_proj|down_proj}.weight",
               "language_model.layers.{i}.mlp.{expert}.{lin}.weight"),
        rename("model.norm.weight", "language_model.norm.weight"),
        rename("lm_head.weight", "lm_head.weight"),
        drop("model.layers.{i}.self_attn.rotary_emb.inv_freq",
             "rotary frequencies are a buffer of THUDM's code; our model recomputes them from the config"),
        *_vision_rules(vis + "patch_embedding.", {"proj": "proj", "cls": "cls_embedding",
                                                   "pos": "position_embedding.weight"},
                       vis + "transformer.layers.", ("fc1", "fc2")),
        *_adapter_rules(vis),
    ]


def sat_rules() -> list:
    vit = "mixins.eva.vit_model."
    layer = "language_model.layers.{i}."
    return [
        rename("transformer.word_embeddings.weight", "language_model.embed_tokens.weight"),
        rename("transformer.layers.{i}.{ln:input_layernorm|post_attention_layernorm}.weight", layer + "{ln}.weight"),
        rename("transformer.layers.{i}.attention.query_key_value.weight",
               layer + "self_attn.language_expert_query_key_value.weight"),
        rename("transformer.layers.{i}.attention.dense.weight", layer + "self_attn.language_expert_dense.weight"),
        # the visual expert lives in SAT mixins: ModuleDicts keyed by the layer number
        rename("mixins.rotary.vision_query_key_value_list.{i}.{wb}",
               layer + "self_attn.vision_expert_query_key_value.{wb}"),
        rename("mixins.rotary.vision_dense_list.{i}.weight", layer + "self_attn.vision_expert_dense.weight"),
        rename("mixins.mlp.gate_proj.{i}.weight", layer + "mlp.language_mlp.gate_proj.weight"),
        rename("transformer.layers.{i}.mlp.dense_h_to_4h.weight", layer + "mlp.language_mlp.up_proj.weight"),
        rename("transformer.layers.{i}.mlp.dense_4h_to_h.weight", layer + "mlp.language_mlp.down_proj.weight"),
        rename("mixins.mlp.vision_gate_proj.{i}.weight", layer + "mlp.vision_mlp.gate_proj.weight"),
        rename("mixins.mlp.vision_dense_h_to_4h_list.{i}.weight", layer + "mlp.vision_mlp.up_proj.weight"),
        rename("mixins.mlp.vision_dense_4h_to_h_list.{i}.weight", layer + "mlp.vision_mlp.down_proj.weight"),
        rename("transformer.final_layernorm.weight", "language_model.norm.weight"),
        rename("mixins.lm.lm_head.weight", "lm_head.weight"),
        drop("mixins.rotary.rotary_emb.inv_freq",
             "rotary frequencies are a persistent SAT buffer; our model recomputes them from the config"),
        # SAT's ViT is a BaseModel with a one-row vocabulary: its "word embedding" is the CLS token
        *_vision_rules(vit, {"proj": "mixins.patch_embedding.proj", "cls": "transformer.word_embeddings.weight",
                             "pos": "transformer.position_embeddings.weight"},
                       vit + "transformer.layers.", ("dense_h_to_4h", "dense_4h_to_h")),
        *_adapter_rules("mixins.eva."),
    ]


# --- config ----------------------------------------------------------------------------------------------

def _hidden_act(f: Fields, default: str):
    from transformers.activations import ACT2FN

    return f.str("hidden_act", default=default, choices=tuple(sorted(ACT2FN)))


def _vision_config(vf: Fields, *, version: str, hf: bool) -> dict:
    """EVA2-CLIP-E from THUDM's ``vision_config`` (``hf``) or SAT's ``eva_args``, with its relations checked."""
    problems = vf.problems
    v_hidden = vf.int("hidden_size", max=MAX_WIDTH)
    if hf:
        v_heads = vf.int(("num_heads", "num_attention_heads"), max=MAX_WIDTH)
        v = dict(
            image_size=vf.image_size(),
            patch_size=vf.int("patch_size", max=MAX_IMAGE),
            num_channels=vf.int("in_channels", default=3, max=64),
            hidden_size=v_hidden,
            intermediate_size=vf.int("intermediate_size", max=MAX_WIDTH),
            num_hidden_layers=vf.int("num_hidden_layers", max=MAX_LAYERS),
            num_attention_heads=v_heads,
            layer_norm_eps=vf.number("layer_norm_eps", default=1e-6, max=1.0),
            hidden_act=_hidden_act(vf, "gelu"),
        )
        positions = vf.int("num_positions", required=False, max=MAX_POSITIONS)
    else:
        v_heads = vf.int("num_attention_heads", max=MAX_WIDTH)
        v = dict(
            image_size=vf.image_size(),
            patch_size=vf.int("patch_size", default=14, max=MAX_IMAGE),
            num_channels=vf.int("in_channels", default=3, max=64),
            hidden_size=v_hidden,
            intermediate_size=vf.int("inner_hidden_size", default=4 * (v_hidden or 0) or None, max=MAX_WIDTH),
            num_hidden_layers=vf.int("num_layers", max=MAX_LAYERS),
            num_attention_heads=v_heads,
            # SAT's BaseTransformer default; CogVLM's eva_args set 1e-6
            layer_norm_eps=vf.number("layernorm_epsilon", default=1e-5, max=1.0),
        )
        positions = vf.int("max_sequence_length", required=False, max=MAX_POSITIONS)
    vf.divisible("hidden_size", v_hidden, "num_attention_heads", v_heads)
    v.update(qkv_bias=True, layernorm_order="post_sublayer", use_post_layernorm=False, drop_cls_token=True)
    if v["image_size"] and v["patch_size"] and vf.divisible("image_size", v["image_size"], "patch_size",
                                                            v["patch_size"]):
        grid = v["image_size"] // v["patch_size"]
        if positions is not None and positions != grid * grid + 1:
            problems.append(f"{vf.where}: {positions} positions but a {v['image_size']} px image with patch "
                            f"{v['patch_size']} has {grid}x{grid} patches + CLS = {grid * grid + 1}")
        if version == "cogvlm2" and grid % 2:
            problems.append(f"{vf.where}: CogVLM2's 2x2 conv needs an even patch grid, got {grid}x{grid}")
    return v


def _text_config(t_f: Fields, *, version: str, hf: bool) -> dict:
    """The language model from THUDM's ``config.json`` (``hf``) or SAT's ``model_config.json``, checked."""
    where, problems = t_f.where, t_f.problems
    heads = t_f.int("num_attention_heads", max=MAX_WIDTH)
    hidden = t_f.int("hidden_size", max=MAX_WIDTH)
    # CogVLM2's grouped-query heads are called num_multi_query_heads in THUDM's code
    kv_heads = t_f.int(("num_multi_query_heads", "num_key_value_heads"), default=heads, required=False,
                       max=MAX_WIDTH)
    if t_f.divisible("hidden_size", hidden, "num_attention_heads", heads) and hidden and heads \
            and (hidden // heads) % 2:
        problems.append(f"{where}: head dim {hidden // heads} is odd; rotary embeddings need an even one")
    t_f.divisible("num_attention_heads", heads, "key/value heads", kv_heads)
    t = dict(
        vocab_size=t_f.int("vocab_size", max=MAX_VOCAB),
        hidden_size=hidden,
        intermediate_size=t_f.int("intermediate_size" if hf else "inner_hidden_size", max=MAX_WIDTH),
        num_hidden_layers=t_f.int("num_hidden_layers" if hf else "num_layers", max=MAX_LAYERS),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rope_theta=t_f.number("rope_theta", default=ROPE_THETA[version]),
        rms_norm_eps=t_f.number("rms_norm_eps" if hf else "layernorm_epsilon", default=1e-5, max=1.0),
        max_position_embeddings=t_f.int("max_position_embeddings" if hf else "max_sequence_length",
                                        default=2048 if version == "cogvlm" else 8192, max=MAX_POSITIONS),
        vision_qkv_bias=version == "cogvlm2",
        hidden_act=_hidden_act(t_f, "silu"),
    )
    if version == "cogvlm2" and heads is not None and kv_heads == heads:
        problems.append(f"{where}: the checkpoint has CogVLM2's conv but no num_multi_query_heads (8 KV heads)")
    if not hf and t_f.bool("use_bias", default=False):
        problems.append(f"{where}: use_bias=true; CogVLM's language linears have no bias")
    return t


def _token_ids(t_f: Fields, tokenizer, version: str) -> dict:
    """bos/eos/pad: the config's (a list of eos ids keeps the first), checked against the tokenizer's; else the
    tokenizer's; else the version's defaults."""
    where, problems, ids = t_f.where, t_f.problems, {}
    defaults = {"bos_token_id": (1, 128000), "eos_token_id": (2, 128001), "pad_token_id": (0, 128002)}
    for key, (v1, v2) in defaults.items():
        from_cfg = t_f.data.get(key)
        if isinstance(from_cfg, list) and key == "eos_token_id":  # a list of stop ids: the config keeps the first
            ok = bool(from_cfg) and all(is_int(i) and 0 <= i < MAX_VOCAB for i in from_cfg)
            if not ok:
                problems.append(f"{where}: eos_token_id must be an integer >= 0 or a list of them, got {from_cfg!r}")
            from_cfg = from_cfg[0] if ok else None
        else:
            from_cfg = t_f.int(key, required=False, min=0, max=MAX_VOCAB)
        from_tok = getattr(tokenizer, key, None) if tokenizer is not None else None
        if key != "pad_token_id" and from_cfg is not None and from_tok is not None and from_cfg != from_tok:
            problems.append(f"{where}: {key}={from_cfg} but the tokenizer's is {from_tok} (wrong tokenizer?)")
        ids[key] = from_cfg if from_cfg is not None else from_tok if from_tok is not None else (
            v1 if version == "cogvlm" else v2)
    return ids


def cogvlm_config(text: dict, *, version: str, where: str, tokenizer, hf: bool):
    """``CogVLMConfig`` from THUDM's HF ``config.json`` (``hf``: ``vision_config``) or SAT's ``model_config.json``
    (``eva_args``). Types, ranges and the relations between fields are checked first; every problem is
    reported in one ``ConversionError``."""
    from modeling_visualglm.configuration_cogvlm import CogVLMConfig
    from modeling_visualglm.processing_cogvlm import TEMPLATES

    problems: list[str] = []
    t_f = Fields(text, where, problems)
    vf = t_f.section("vision_config" if hf else "eva_args")
    if not hf:
        for key, want in {"layernorm_order": "post", "use_final_layernorm": False, "pre_len": 1,
                          "post_len": 0}.items():
            if key in vf.data and vf.data[key] != want:
                problems.append(f"{vf.where}: {key}={vf.data[key]!r} is not EVA2-CLIP-E's ({want!r}); unsupported")
    v = _vision_config(vf, version=version, hf=hf)
    t = _text_config(t_f, version=version, hf=hf)
    t.update(_token_ids(t_f, tokenizer, version))
    vocab = t["vocab_size"]
    if tokenizer is not None and vocab and len(tokenizer) > vocab:
        problems.append(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab} "
                        "embedding rows (wrong tokenizer?)")
    template = t_f.str("template_version", default="chat", choices=TEMPLATES)
    raise_if(problems, f"cannot build a CogVLM config from {where}")
    return build_config(CogVLMConfig, where, version=version, vision_config=v, text_config=t, template_version=template)


# --- tokenizer -------------------------------------------------------------------------------------------

def load_tokenizer(explicit: str | None, fallback: Path):
    """``--tokenizer`` (a tokenizer folder, or a file inside one), else ``fallback`` if it holds one."""
    found = find_tokenizer(explicit, [fallback], TOKENIZER_FILES)
    if found is None:
        return None
    tokenizer = load_tokenizer_folder(found.parent)
    if tokenizer.bos_token_id is None:
        raise ConversionError(f"{found.parent}: the tokenizer has no bos token; CogVLM prompts start with one")
    return tokenizer


def _loaded(source, rules, config, tokenizer, notes, version):
    from modeling_visualglm.modeling_cogvlm import CogVLMForConditionalGeneration

    notes = [*notes, f"version {version}: " + (
        "2x2 conv downsample, RoPE base 500000, vision-expert qkv bias" if version == "cogvlm2"
        else "no downsample, RoPE base 10000"),
        f"image placeholders use id {config.image_token_id} (the text vocab size), not the original pad id"]
    if tokenizer is None:
        notes.append("no tokenizer found: the folder will be marked incomplete (pass --tokenizer: "
                     "a Vicuna-7B-v1.5 / Llama tokenizer folder for CogVLM1)")
    return Loaded(source=source, rules=rules, config=config, model_class=CogVLMForConditionalGeneration,
                  family=COGVLM, tokenizer=tokenizer, notes=notes)


# --- formats ---------------------------------------------------------------------------------------------

class SatCogVLM(Format):
    name = "sat-cogvlm"
    help = ("SwissArmyTransformer CogVLM release (--src with latest, <iter>/mp_rank_00_model_states.pt, "
            "model_config.json)")
    required_flags = ("src",)
    optional_flags = {"lora_as_adapter": None}

    def rule_table(self, config) -> list:
        return sat_rules()

    def load(self, args) -> Loaded:
        sat = open_sat_folder(existing_dir(args.src, "--src"), family="CogVLM",
                              merge_hint="THUDM/CogVLM utils/merge_model.py")
        if not isinstance(sat.args.get("eva_args"), dict):
            raise ConversionError(f"{sat.where} has no eva_args object: not a CogVLM checkpoint")
        with closed_on_error(torch_file_source(sat.checkpoint, subkey="module")) as source:
            version = "cogvlm2" if "mixins.eva.conv.weight" in source else "cogvlm"
            tokenizer = load_tokenizer(args.tokenizer, sat.folder)
            config = cogvlm_config(sat.args, version=version, where=sat.where, tokenizer=tokenizer, hf=False)
            loaded = _loaded(source, self.rule_table(config), config, tokenizer, [sat.describe()], version)
            # fine-tuned checkpoints (finetune_cogvlm_demo.py): LoRA merged or split off as a peft adapter
            return attach_sat_lora(loaded, source, sat, Path(args.out), adapter_dir(args))


class HfCogVLM(Format):
    name = "hf-cogvlm"
    help = ("THUDM cogvlm-*-hf / cogvlm2-llama3-* folder (config.json with vision_config, safetensors or .bin "
            "shards); CogVLM1 needs --tokenizer (Vicuna-7B-v1.5)")
    required_flags = ("src",)

    def rule_table(self, config) -> list:
        return hf_rules()

    def load(self, args) -> Loaded:
        src = existing_dir(args.src, "--src")
        cfg = read_json_object(src / "config.json")
        if not isinstance(cfg.get("vision_config"), dict):
            raise ConversionError(f"{src}/config.json has no vision_config: not a CogVLM HF folder")
        with closed_on_error(hf_folder_source(src)) as source:
            version = "cogvlm2" if "model.vision.conv.weight" in source else "cogvlm"
            tokenizer = load_tokenizer(args.tokenizer, src)
            config = cogvlm_config(cfg, version=version, where=f"{src}/config.json", tokenizer=tokenizer, hf=True)
        notes = [f"THUDM HF folder {src} ({len(source)} tensors)"]
        return _loaded(source, self.rule_table(config), config, tokenizer, notes, version)
