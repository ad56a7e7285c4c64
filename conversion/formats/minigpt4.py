"""MiniGPT-4 sources (``--format minigpt4``): ``--ckpt`` (``pretrained_minigpt4*.pth`` or a MiniGPT-v2 checkpoint,
``{'model': sd}``), ``--llm`` (a plain transformers Llama folder, e.g. from ``--format fastchat-delta``),
``--vit`` (``eva_vit_g.pth``, raw EVA-CLIP ViT-g) and ``--blip2`` (LAVIS ``blip2_pretrained_flant5xxl.pth``,
``{'model': sd}``; vicuna0 only). Spec minigpt4.md §1-2.

What it does, as the original loads them (MiniGPT-4 @ef1ac08 ``mini_gpt4.py``, LAVIS ``blip2.py``):
- ViT: ``eva_vit_g.pth`` has one block more than BLIP-2 runs (40 vs 39; loaded with strict=False): the last
  block of a ``--vit`` file is dropped. A ViT inside the BLIP-2 file (``visual_encoder.*``) wins over
  ``--vit``, as LAVIS loads the BLIP-2 checkpoint over the tower. ``q_bias``/``v_bias`` become the fused qkv
  bias cat(q_bias, 0, v_bias) (K has no bias). Heads: EVA ViT-g's head dim is 88 (1408 / 16).
- ``ln_vision``: from the BLIP-2 file (vicuna0); the LLaMA-2 / v2 code never loads a BLIP-2 checkpoint, so
  its LayerNorm keeps the fresh init (weight 1, bias 0), written here explicitly.
- Q-Former: LAVIS/BERT names → our SAT-order blocks (fused qkv, cross-attention [K; V]; BERT's output
  LayerNorm of layer i is our layer i+1 ``input_layernorm``); head dim 64 (BERT-base).
- Variant: ``llama_proj`` in_features 768 (the Q-Former width) → vicuna0; 4 × the ViT width → llama2, or
  minigptv2 when the checkpoint carries LoRA keys. The v2 LoRA (r 64, α 16: scale α/r) is merged into
  q_proj/v_proj, and the ViT positions are interpolated bicubically from the checkpoint grid to twice its
  side (224 → 448 px), as ``interpolate_pos_embed`` does.
- Image placeholder: ``image_token_id`` = the tokenizer size (32000). Vicuna-v0 folders have a spare row
  there (FastChat's [PAD]); otherwise one zero row is appended to ``embed_tokens`` and ``lm_head``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConversionError, UsageError
from ..rules import convert, drop, rename
from ..sources import (TOKENIZER_FILES, PrefixedSource, StateDictSource, find_tokenizer, hf_folder_source,
                       load_tokenizer_folder, load_torch_file, read_json_object)
from ..validate import MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, Fields, build_config, raise_if
from .base import Format, Loaded, existing_dir

VIT_HEAD_DIM = 88  # EVA ViT-g: 1408 / 16 heads
BERT_HEAD_DIM = 64  # bert-base-uncased: 768 / 12 heads
LORA_ALPHA = 16  # MiniGPT-v2's LoraConfig; the rank is read from the lora_A shapes (r 64 in the release)
VARIANTS = ("vicuna0", "llama2", "minigptv2")


# --- rule tables --------------------------------------------------------------------------------------------
# Per-layer tables, expanded by :func:`per_layer`: a row is (source template(s), target template, op or None),
# under a source and a target prefix in which ``<n>`` is the layer number and ``<n+1>`` the next one. They are
# spelled out per layer (not with an ``{i}`` slot) where layers differ: BLIP-2 runs fewer ViT blocks than
# eva_vit_g.pth holds, the Q-Former cross-attends in every other layer, and BERT's end-of-layer LayerNorm is
# the start of our next layer.

VIT_BLOCK = [  # LAVIS eva_vit.py Block → our EVA layer
    ("norm1.{wb}", "input_layernorm.{wb}", None),
    ("norm2.{wb}", "post_attention_layernorm.{wb}", None),
    ("attn.qkv.weight", "attention.query_key_value.weight", None),
    (("attn.q_bias", "attn.v_bias"), "attention.query_key_value.bias", "minigpt4_qv_bias"),
    ("attn.proj.{wb}", "attention.dense.{wb}", None),
    ("mlp.fc1.{wb}", "mlp.dense_h_to_4h.{wb}", None),
    ("mlp.fc2.{wb}", "mlp.dense_4h_to_h.{wb}", None),
]
QFORMER_LAYER = [  # LAVIS Qformer.py BertLayer (query branch) → our SAT-order Q-Former layer
    (("attention.self.query.{wb}", "attention.self.key.{wb}", "attention.self.value.{wb}"),
     "attention.query_key_value.{wb}", "fuse_qkv"),
    ("attention.output.dense.{wb}", "attention.dense.{wb}", None),
    ("attention.output.LayerNorm.{wb}", "post_attention_layernorm.{wb}", None),
    ("intermediate_query.dense.{wb}", "mlp.dense_h_to_4h.{wb}", None),
    ("output_query.dense.{wb}", "mlp.dense_4h_to_h.{wb}", None),
]
QFORMER_CROSS = [  # the cross-attention of every cross_attention_freq-th layer; key/value fused blocked [K; V]
    ("crossattention.self.query.{wb}", "cross_attention.query.{wb}", None),
    (("crossattention.self.key.{wb}", "crossattention.self.value.{wb}"), "cross_attention.key_value.{wb}", "concat"),
    ("crossattention.output.dense.{wb}", "cross_attention.dense.{wb}", None),
    ("crossattention.output.LayerNorm.{wb}", "post_cross_attention_layernorm.{wb}", None),
]
# BERT normalizes at the end of a layer, SAT-order blocks at the start of the next: layer <n>'s → <n+1>'s
QFORMER_OUTPUT_LN = [("output_query.LayerNorm.{wb}", "input_layernorm.{wb}", None)]


def _source_names(rows) -> str:
    """Every source tensor name of ``rows`` (``{wb}`` spelled out), as template alternatives ``a|b|…``."""
    names = []
    for source, _, _ in rows:
        for name in (source,) if isinstance(source, str) else source:
            names += [name.replace("{wb}", wb) for wb in ("weight", "bias")] if "{wb}" in name else [name]
    return "|".join(names)


def per_layer(rows, layers, src: str, dst: str = "", *, dropped: str | None = None) -> list:
    """The rules of the per-layer table ``rows`` for each layer number in ``layers``, sources under ``src`` and
    targets under ``dst`` (``<n>``, ``<n+1>``: the layer number and the next). With ``dropped`` (the reason) each
    layer's tensors are dropped instead, one rule per layer."""
    rules = []
    for n in layers:
        def at(prefix, name, n=n):
            return (prefix + name).replace("<n+1>", str(n + 1)).replace("<n>", str(n))

        if dropped is not None:
            rules.append(drop(at(src, "{rest:" + _source_names(rows) + "}"), dropped))
            continue
        for source, target, op in rows:
            sources = tuple(at(src, name) for name in ((source,) if isinstance(source, str) else source))
            rules.append(convert(sources, at(dst, target), op) if op else rename(sources[0], at(dst, target)))
    return rules


def vit_rules(prefix: str, n_blocks: int, depth: int, pos_grid: int | None) -> list:
    v = "vision_model."
    pos_op = ("minigpt4_interpolate_pos", {"grid": pos_grid}) if pos_grid else ("squeeze0", {})
    return [
        convert(prefix + "cls_token", v + "embeddings.cls_embedding", "squeeze0"),  # [1, 1, H] → [1, H]
        convert(prefix + "pos_embed", v + "embeddings.position_embedding", pos_op[0], **pos_op[1]),
        rename(prefix + "patch_embed.proj.{wb}", v + "embeddings.patch_embedding.{wb}"),
        *per_layer(VIT_BLOCK, range(depth), prefix + "blocks.<n>.", v + "layers.<n>."),
        *per_layer(VIT_BLOCK, range(depth, n_blocks), prefix + "blocks.<n>.",
                   dropped="BLIP-2 runs the first 39 of EVA-CLIP-g's 40 blocks (loaded with strict=False)"),
    ]


def qformer_rules(n_layers: int, freq: int = 2) -> list:
    bert, q = "blip2.Qformer.bert.", "qformer."
    layer = bert + "encoder.layer.<n>."
    return [
        convert("blip2.query_tokens", q + "query_tokens", "squeeze0"),
        rename(bert + "embeddings.LayerNorm.{wb}", q + "layers.0.input_layernorm.{wb}"),
        drop(bert + "embeddings.position_ids", "BERT's position-id buffer; the Q-Former has no text positions"),
        *per_layer(QFORMER_LAYER, range(n_layers), layer, q + "layers.<n>."),
        *per_layer(QFORMER_CROSS, range(0, n_layers, freq), layer, q + "layers.<n>."),
        *per_layer(QFORMER_OUTPUT_LN, range(n_layers - 1), layer, q + "layers.<n+1>."),
        rename(f"{bert}encoder.layer.{n_layers - 1}.output_query.LayerNorm.{{wb}}", q + "final_layernorm.{wb}"),
    ]


def llm_rules(rows: int, lora: bool) -> list:
    m, o = "llm.model.layers.{i}.", "language_model.layers.{i}."
    qkv_src = tuple(m + f"self_attn.{p}_proj.weight" for p in "qkv")
    if lora:
        lp = "ckpt.llama_model.base_model.model.model.layers.{i}.self_attn."
        lora_src = tuple(lp + f"{p}_proj.lora_{ab}.default.weight" for p in "qv" for ab in "AB")
        qkv = convert(qkv_src + lora_src, o + "self_attn.language_expert_query_key_value.weight",
                      "minigpt4_fuse_qkv_lora", alpha=LORA_ALPHA)
    else:
        qkv = convert(qkv_src, o + "self_attn.language_expert_query_key_value.weight", "fuse_qkv")
    return [
        convert("llm.model.embed_tokens.weight", "language_model.embed_tokens.weight", "minigpt4_pad_rows", rows=rows),
        convert("llm.lm_head.weight", "lm_head.weight", "minigpt4_pad_rows", rows=rows),
        qkv,
        rename(m + "self_attn.o_proj.weight", o + "self_attn.language_expert_dense.weight"),
        rename(m + "mlp.{p:gate_proj|up_proj|down_proj}.weight", o + "mlp.language_mlp.{p}.weight"),
        rename(m + "{n:input_layernorm|post_attention_layernorm}.weight", o + "{n}.weight"),
        rename("llm.model.norm.weight", "language_model.norm.weight"),
        drop("llm.model.layers.{i}.self_attn.rotary_emb.inv_freq", "rotary buffer; recomputed from rope_theta"),
    ]


# --- reading the files --------------------------------------------------------------------------------------

def _state_dict(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"{what} {path} not found")
    obj = load_torch_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # LAVIS / MiniGPT-4 runner checkpoints: {'model': sd, 'optimizer': ..., ...}
    if not isinstance(obj, dict):
        raise ConversionError(f"{what} {path}: expected a state dict, found {type(obj).__name__}")
    return obj


def _source(name: str, path, sd: dict) -> StateDictSource:
    src, problems = StateDictSource(f"{name} {path}"), []
    src.add(path, sd, problems)
    if problems:
        raise ConversionError(problems, header=f"cannot read {path}")
    return src


def _layers(sd: dict, prefix: str) -> int:
    """1 + the largest N of keys ``prefix + "N." …`` (keys with anything else there are left to the rule table)."""
    idx = set()
    for k in sd:
        if isinstance(k, str) and k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit() and head.isascii() and len(head) < 6:
                idx.add(int(head))
    return max(idx) + 1 if idx else 0


def _tensor(sd: dict, key: str, ndim: int, what: str) -> torch.Tensor:
    """``sd[key]`` checked to be a tensor with ``ndim`` dims: the shapes the config is read from."""
    t = sd.get(key)
    if not isinstance(t, torch.Tensor):
        found = "missing" if t is None else f"a {type(t).__name__}, not a tensor"
        raise ConversionError(f"{what}: {key} is {found}: not the checkpoint this format expects")
    if t.dim() != ndim or any(n < 1 for n in t.shape):
        raise ConversionError(f"{what}: {key} has shape {list(t.shape)}; expected {ndim} non-empty dims")
    return t


def _llm_config(cfg: dict, where: str) -> dict:
    """The Llama ``config.json`` fields MiniGPT-4 reads, type-, range- and relation-checked."""
    problems: list[str] = []
    f = Fields(cfg, where, problems)
    hidden = f.int("hidden_size", max=MAX_WIDTH)
    heads = f.int("num_attention_heads", max=MAX_WIDTH)
    kv = f.int("num_key_value_heads", default=heads, required=False, max=MAX_WIDTH)
    if f.divisible("hidden_size", hidden, "num_attention_heads", heads) and hidden and heads and (hidden // heads) % 2:
        problems.append(f"{where}: head dim {hidden // heads} is odd; rotary embeddings need an even one")
    f.divisible("num_attention_heads", heads, "num_key_value_heads", kv)
    rope = f.section("rope_parameters", required=False)
    theta = rope.number("rope_theta", default=None, required=False) or f.number("rope_theta", default=10000.0)
    out = dict(vocab_size=f.int("vocab_size", max=MAX_VOCAB), hidden_size=hidden,
               intermediate_size=f.int("intermediate_size", max=MAX_WIDTH),
               num_hidden_layers=f.int("num_hidden_layers", max=MAX_LAYERS), num_attention_heads=heads,
               num_key_value_heads=kv, rms_norm_eps=f.number("rms_norm_eps", default=1e-6, max=1.0),
               rope_theta=theta, max_position_embeddings=f.int("max_position_embeddings", default=2048,
                                                               max=MAX_POSITIONS))
    raise_if(problems, f"cannot read the language model config {where}")
    return out


@dataclass
class Inputs:
    """The MiniGPT-4 checkpoint files, loaded memory-mapped, with the shapes the variant and config are read from."""

    ckpt_path: Path
    ckpt: dict
    blip2: dict | None  # --blip2's state dict
    vit: dict | None  # --vit's state dict
    vit_in_blip2: bool  # the BLIP-2 file holds the ViT (visual_encoder.*), which wins over --vit
    vit_what: str  # the flag and file the ViT comes from, for messages
    proj: tuple[int, int]  # llama_proj.weight [out, in]
    has_lora: bool
    vit_width: int
    positions: int  # pos_embed rows: CLS + the patch grid
    patch: int
    vit_inter: int
    qformer_width: int

    @property
    def vit_sd(self) -> dict:
        return self.blip2 if self.vit_in_blip2 else self.vit

    @property
    def vit_prefix(self) -> str:
        return "visual_encoder." if self.vit_in_blip2 else ""


def read_inputs(args) -> Inputs:
    ckpt_path = Path(args.ckpt)
    ckpt = _state_dict(ckpt_path, "--ckpt")
    if "llama_proj.weight" not in ckpt:
        raise ConversionError(f"--ckpt {ckpt_path} has no llama_proj.weight: not a MiniGPT-4 checkpoint "
                              f"(found {sorted(map(str, ckpt))[:5]})")
    proj = tuple(_tensor(ckpt, "llama_proj.weight", 2, f"--ckpt {ckpt_path}").shape)
    has_lora = any(isinstance(k, str) and (".lora_A." in k or ".lora_B." in k) for k in ckpt)
    blip2 = _state_dict(Path(args.blip2), "--blip2") if args.blip2 else None
    vit_in_blip2 = blip2 is not None and "visual_encoder.cls_token" in blip2
    if args.vit is None and not vit_in_blip2:
        raise UsageError("--format minigpt4 needs --vit (eva_vit_g.pth) unless the --blip2 file holds the ViT")
    vit = _state_dict(Path(args.vit), "--vit") if args.vit else None
    vit_sd, prefix = (blip2, "visual_encoder.") if vit_in_blip2 else (vit, "")
    if prefix + "cls_token" not in vit_sd:
        raise ConversionError(f"{args.vit}: no cls_token: not an EVA ViT state dict")
    what = f"--blip2 {args.blip2}" if vit_in_blip2 else f"--vit {args.vit}"
    return Inputs(
        ckpt_path=ckpt_path, ckpt=ckpt, blip2=blip2, vit=vit, vit_in_blip2=vit_in_blip2, vit_what=what, proj=proj,
        has_lora=has_lora, vit_width=_tensor(vit_sd, prefix + "cls_token", 3, what).shape[-1],
        positions=_tensor(vit_sd, prefix + "pos_embed", 3, what).shape[1],
        patch=_tensor(vit_sd, prefix + "patch_embed.proj.weight", 4, what).shape[-1],
        vit_inter=_tensor(vit_sd, prefix + "blocks.0.mlp.fc1.weight", 2, what).shape[0],
        qformer_width=(_tensor(blip2, "query_tokens", 3, f"--blip2 {args.blip2}").shape[-1]
                       if blip2 is not None and "query_tokens" in blip2 else 768),
    )


def variant_of(inp: Inputs, requested: str | None, text_width: int, llm_dir: Path) -> str:
    """The variant, from the projector's shape (and LoRA keys), checked against ``--variant``."""
    (out_f, in_f), qf_h, vit_h = inp.proj, inp.qformer_width, inp.vit_width
    if in_f == qf_h:
        inferred = "vicuna0"
    elif in_f == 4 * vit_h:
        inferred = "minigptv2" if inp.has_lora else "llama2"
    else:
        raise ConversionError(
            f"--ckpt llama_proj.weight is {[out_f, in_f]}: in_features {in_f} fits no variant (Q-Former width "
            f"{qf_h} → vicuna0; 4 × ViT width {vit_h} = {4 * vit_h} → llama2 / minigptv2)")
    variant = requested or inferred
    if variant != inferred and not (variant in ("llama2", "minigptv2") and inferred in ("llama2", "minigptv2")
                                    and (variant == "minigptv2") == inp.has_lora):
        raise ConversionError(f"--variant {variant} but the checkpoint is {inferred} (llama_proj in_features "
                              f"{in_f}{', LoRA keys' if inp.has_lora else ', no LoRA keys'})")
    if out_f != text_width:
        sizes = {5120: "13B", 4096: "7B"}
        raise ConversionError(
            f"--ckpt llama_proj.weight is {[out_f, in_f]}: it projects to {out_f} but the language model in "
            f"{llm_dir} has hidden_size {text_width}. This is the 7B/13B mix-up (MiniGPT-4#77): the checkpoint is "
            f"for a {sizes.get(out_f, str(out_f) + '-wide')} LLM, the folder holds a "
            f"{sizes.get(text_width, str(text_width) + '-wide')} one; use the matching pretrained_minigpt4*.pth")
    if variant == "vicuna0" and inp.blip2 is None:
        raise UsageError("--variant vicuna0 needs --blip2 (the Q-Former and ln_vision)")
    return variant


# --- config -------------------------------------------------------------------------------------------------

def load_tokenizer(explicit: str | None, llm_dir: Path, vocab_size: int, notes: list[str]):
    """MiniGPT-4's tokenizer (``--tokenizer`` or the LLM folder's) with the image placeholder id = its size; returns
    (tokenizer, embedding rows: one more than the LLM's when the placeholder needs a new row)."""
    from modeling_visualglm.processing_minigpt4 import MiniGPT4Tokenizer

    found = find_tokenizer(explicit, [llm_dir], TOKENIZER_FILES)
    tokenizer = load_tokenizer_folder(found.parent if found is not None else llm_dir, MiniGPT4Tokenizer)
    image_token_id = len(tokenizer)
    tokenizer.image_token_id = image_token_id
    tokenizer.init_kwargs["image_token_id"] = image_token_id
    rows = max(vocab_size, image_token_id + 1)
    if rows > vocab_size:
        notes.append(f"one zero row added to embed_tokens/lm_head for the image placeholder id {image_token_id}")
    else:
        notes.append(f"image placeholder id {image_token_id}: the LLM's spare row (Vicuna-v0 [PAD])")
    return tokenizer, rows


@dataclass
class VisionShape:
    n_blocks: int  # in the file
    depth: int  # run by BLIP-2
    grid: int  # the checkpoint's patch grid side
    pos_grid: int | None  # MiniGPT-v2: the interpolated side


def vision_config(inp: Inputs, variant: str) -> tuple[dict, VisionShape]:
    n_blocks = _layers(inp.vit_sd, inp.vit_prefix + "blocks.")
    depth = n_blocks if inp.vit_in_blip2 else n_blocks - 1
    vit_h = inp.vit_width
    if vit_h == 1408 and depth != 39:
        raise ConversionError(f"the ViT has {n_blocks} blocks; BLIP-2's ViT-g runs 39 (eva_vit_g.pth has 40)")
    grid = int(round((inp.positions - 1) ** 0.5))
    if grid < 1 or grid * grid + 1 != inp.positions:
        raise ConversionError(f"{inp.vit_what}: pos_embed has {inp.positions} rows, not CLS + a square grid")
    pos_grid = 2 * grid if variant == "minigptv2" else None
    if vit_h % VIT_HEAD_DIM:
        raise ConversionError(f"ViT width {vit_h} is not a multiple of EVA ViT-g's head dim {VIT_HEAD_DIM}")
    vision = dict(image_size=(pos_grid or grid) * inp.patch, patch_size=inp.patch, hidden_size=vit_h,
                  intermediate_size=inp.vit_inter, num_hidden_layers=depth, num_attention_heads=vit_h // VIT_HEAD_DIM,
                  layer_norm_eps=1e-6, post_layernorm_eps=1e-5)
    return vision, VisionShape(n_blocks, depth, grid, pos_grid)


def qformer_config(blip2: dict, what: str, width: int) -> dict:
    n_q = _layers(blip2, "Qformer.bert.encoder.layer.")
    if width % BERT_HEAD_DIM or not n_q:
        raise ConversionError(f"{what}: a Q-Former of width {width} with {n_q} layers is not BLIP-2's "
                              f"(BERT-base heads of {BERT_HEAD_DIM})")
    inter = _tensor(blip2, "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight", 2, what).shape[0]
    return dict(hidden_size=width, num_hidden_layers=n_q, num_attention_heads=width // BERT_HEAD_DIM,
                intermediate_size=inter, num_query_tokens=_tensor(blip2, "query_tokens", 3, what).shape[1],
                layer_norm_eps=1e-12, cross_attention_frequency=2)


def text_config(llm_cfg: dict, rows: int) -> dict:
    keys = ("intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
            "rope_theta", "max_position_embeddings")
    return dict(vocab_size=rows, hidden_size=llm_cfg["hidden_size"], **{k: llm_cfg[k] for k in keys},
                use_visual_experts=False, bos_token_id=1, eos_token_id=2, pad_token_id=None)


# --- sources and rules --------------------------------------------------------------------------------------

def sources_and_rules(inp: Inputs, args, llm_dir: Path, variant: str, config, shape: VisionShape,
                      notes: list[str]) -> tuple[PrefixedSource, list]:
    parts = {"ckpt": _source("--ckpt", inp.ckpt_path, inp.ckpt), "llm": hf_folder_source(llm_dir)}
    rules = [rename("ckpt.llama_proj.{wb}", "llama_proj.{wb}")]
    if variant == "vicuna0":
        parts["blip2"] = _source("--blip2", args.blip2, inp.blip2)
        rules += qformer_rules(config.qformer_config.num_hidden_layers)
        rules += [rename("blip2.ln_vision.{wb}", "vision_model.post_layernorm.{wb}"),
                  drop("blip2.{head:t5_proj|opt_proj}.{wb}", "BLIP-2's projection to its own LLM; MiniGPT-4 "
                       "trains llama_proj instead")]
    else:
        vit_h = inp.vit_width
        fresh = {"ln_vision.weight": torch.ones(vit_h), "ln_vision.bias": torch.zeros(vit_h)}
        parts["fresh"] = _source("fresh init", "(ln_vision, never loaded by the LLaMA-2 code)", fresh)
        rules.append(rename("fresh.ln_vision.{wb}", "vision_model.post_layernorm.{wb}"))
        notes.append("ln_vision at its fresh init (weight 1, bias 0): the LLaMA-2 / v2 code never loads one")
    if inp.vit_in_blip2:
        rules += vit_rules("blip2.visual_encoder.", shape.n_blocks, shape.depth, shape.pos_grid)
        if inp.vit is not None:
            notes.append(f"--vit {args.vit} ignored: the BLIP-2 file's ViT is loaded over eva_vit_g.pth")
    else:
        parts["vit"] = _source("--vit", args.vit, inp.vit)
        rules += vit_rules("vit.", shape.n_blocks, shape.depth, shape.pos_grid)
    rules += llm_rules(config.text_config.vocab_size, lora=variant == "minigptv2")
    if variant == "minigptv2":
        notes.append(f"LoRA merged into q_proj/v_proj (lora_alpha {LORA_ALPHA} / r); ViT positions interpolated "
                     f"{shape.grid}x{shape.grid} → {shape.pos_grid}x{shape.pos_grid}")
    return PrefixedSource(parts, description=f"MiniGPT-4 {variant} ({', '.join(parts)})"), rules


class MiniGPT4Format(Format):
    name = "minigpt4"
    help = ("MiniGPT-4 / MiniGPT-v2 (--ckpt pretrained_minigpt4*.pth, --llm transformers Llama folder, --vit "
            "eva_vit_g.pth, --blip2 blip2_pretrained_flant5xxl.pth for vicuna0) → hub folder")
    required_flags = ("ckpt", "llm")
    optional_flags = {"blip2": None, "vit": None, "variant": None}

    def load(self, args) -> Loaded:
        from ...hub_export.families import MINIGPT4
        from modeling_visualglm.configuration_minigpt4 import MiniGPT4Config
        from modeling_visualglm.modeling_minigpt4 import MiniGPT4ForConditionalGeneration

        if args.variant is not None and args.variant not in VARIANTS:
            raise UsageError(f"--variant must be vicuna0, llama2 or minigptv2, not {args.variant!r}")
        llm_dir = existing_dir(args.llm, "--llm")
        llm_cfg = _llm_config(read_json_object(llm_dir / "config.json"), f"{llm_dir}/config.json")
        inp = read_inputs(args)
        notes = [f"MiniGPT-4 checkpoint {inp.ckpt_path}, language model {llm_dir}"]
        variant = variant_of(inp, args.variant, llm_cfg.get("hidden_size"), llm_dir)
        tokenizer, rows = load_tokenizer(args.tokenizer, llm_dir, llm_cfg["vocab_size"], notes)
        vision, shape = vision_config(inp, variant)
        qformer = qformer_config(inp.blip2, f"--blip2 {args.blip2}", inp.qformer_width) if variant == "vicuna0" else None
        config = build_config(MiniGPT4Config, f"MiniGPT-4 {variant}", variant=variant, vision_config=vision,
                              qformer_config=qformer, text_config=text_config(llm_cfg, rows),
                              image_token_id=tokenizer.image_token_id)
        source, rules = sources_and_rules(inp, args, llm_dir, variant, config, shape, notes)
        return Loaded(source=source, rules=rules, config=config, model_class=MiniGPT4ForConditionalGeneration,
                      family=MINIGPT4, tokenizer=tokenizer, notes=notes)
