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
  its LayerNorm keeps the fresh init (weight 1, bias 0), written here explicitly (spec §8).
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

from pathlib import Path

import torch

from ..errors import ConversionError, UsageError
from ..ops import register
from ..rules import convert, drop, rename
from ..sources import PrefixedSource, StateDictSource, hf_folder_source, load_torch_file
from ..validate import MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, Fields, build_config, raise_if
from .base import Format, Loaded, existing_dir
from .llama import load_tokenizer_folder, read_json

VIT_HEAD_DIM = 88  # EVA ViT-g: 1408 / 16 heads
BERT_HEAD_DIM = 64  # bert-base-uncased: 768 / 12 heads
LORA_ALPHA = 16  # MiniGPT-v2's LoraConfig; the rank is read from the lora_A shapes (r 64 in the release)


# --- ops ----------------------------------------------------------------------------------------------------

@register("minigpt4_qv_bias")
def qv_bias(q_bias: torch.Tensor, v_bias: torch.Tensor) -> tuple[torch.Tensor]:
    """EVA's separate q/v biases → one [3H] qkv bias with a zero K slice (the bias EVA's attention applies)."""
    return (torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]),)


@register("minigpt4_pad_rows")
def pad_rows(t: torch.Tensor, *, rows: int) -> tuple[torch.Tensor]:
    """Append zero rows up to ``rows`` (the image placeholder's row; never looked up, never sampled)."""
    if t.shape[0] > rows:
        raise ValueError(f"{t.shape[0]} rows, more than {rows}")
    if t.shape[0] == rows:
        return (t,)
    return (torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))]),)


@register("minigpt4_interpolate_pos")
def interpolate_pos(t: torch.Tensor, *, grid: int) -> tuple[torch.Tensor]:
    """[1, 1 + g², H] → [1 + grid², H]: CLS kept, the g×g position grid resized bicubically (fp32,
    align_corners False), as MiniGPT-v2's ``interpolate_pos_embed``."""
    t = t[0]
    cls, pos = t[:1], t[1:]
    g = int(round(pos.shape[0] ** 0.5))
    if g * g != pos.shape[0]:
        raise ValueError(f"{pos.shape[0]} positions are not a square grid")
    if t.is_meta:
        return (t.new_empty((1 + grid * grid, t.shape[1])),)
    pos = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    pos = torch.nn.functional.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False)
    pos = pos.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(t.dtype)
    return (torch.cat([cls, pos]),)


@register("minigpt4_fuse_qkv_lora")
def fuse_qkv_lora(q, k, v, qa, qb, va, vb, *, alpha: float) -> tuple[torch.Tensor]:
    """q/k/v with the LoRA deltas of q and v merged (W + alpha/r · B A, peft's scaling), then fused blocked [Q; K; V]."""
    scale = alpha / qa.shape[0]  # lora_A is [r, in]
    if not q.is_meta:
        q = (q.float() + scale * (qb.float() @ qa.float())).to(q.dtype)
        v = (v.float() + scale * (vb.float() @ va.float())).to(v.dtype)
    return (torch.cat([q, k, v]),)


# --- rules --------------------------------------------------------------------------------------------------

def vit_rules(prefix: str, n_blocks: int, depth: int, pos_grid: int | None) -> list:
    v = "vision_model."
    pos = (convert(prefix + "pos_embed", v + "embeddings.position_embedding", "minigpt4_interpolate_pos", grid=pos_grid)
           if pos_grid else convert(prefix + "pos_embed", v + "embeddings.position_embedding", "squeeze0"))
    rules = [
        convert(prefix + "cls_token", v + "embeddings.cls_embedding", "squeeze0"),  # [1, 1, H] → [1, H]
        pos,
        rename(prefix + "patch_embed.proj.{wb}", v + "embeddings.patch_embedding.{wb}"),
    ]
    for i in range(n_blocks):
        b, o = f"{prefix}blocks.{i}.", f"{v}layers.{i}."
        if i >= depth:
            rules.append(drop(b + "{rest:norm1.weight|norm1.bias|norm2.weight|norm2.bias|attn.qkv.weight|attn.q_bias|"
                              "attn.v_bias|attn.proj.weight|attn.proj.bias|mlp.fc1.weight|mlp.fc1.bias|"
                              "mlp.fc2.weight|mlp.fc2.bias}",
                              "BLIP-2 runs the first 39 of EVA-CLIP-g's 40 blocks (loaded with strict=False)"))
            continue
        rules += [
            rename(b + "norm1.{wb}", o + "input_layernorm.{wb}"),
            rename(b + "norm2.{wb}", o + "post_attention_layernorm.{wb}"),
            rename(b + "attn.qkv.weight", o + "attention.query_key_value.weight"),
            convert((b + "attn.q_bias", b + "attn.v_bias"), o + "attention.query_key_value.bias", "minigpt4_qv_bias"),
            rename(b + "attn.proj.{wb}", o + "attention.dense.{wb}"),
            rename(b + "mlp.fc1.{wb}", o + "mlp.dense_h_to_4h.{wb}"),
            rename(b + "mlp.fc2.{wb}", o + "mlp.dense_4h_to_h.{wb}"),
        ]
    return rules


def qformer_rules(n_layers: int, freq: int = 2) -> list:
    bert, q = "blip2.Qformer.bert.", "qformer."
    rules = [
        convert("blip2.query_tokens", q + "query_tokens", "squeeze0"),
        rename(bert + "embeddings.LayerNorm.{wb}", q + "layers.0.input_layernorm.{wb}"),
        drop(bert + "embeddings.position_ids", "BERT's position-id buffer; the Q-Former has no text positions"),
    ]
    for i in range(n_layers):
        s, o = f"{bert}encoder.layer.{i}.", f"{q}layers.{i}."
        nxt = f"{q}layers.{i + 1}.input_layernorm.{{wb}}" if i + 1 < n_layers else q + "final_layernorm.{wb}"
        rules += [
            convert(tuple(s + f"attention.self.{p}.{{wb}}" for p in ("query", "key", "value")),
                    o + "attention.query_key_value.{wb}", "fuse_qkv"),
            rename(s + "attention.output.dense.{wb}", o + "attention.dense.{wb}"),
            rename(s + "attention.output.LayerNorm.{wb}", o + "post_attention_layernorm.{wb}"),
            rename(s + "intermediate_query.dense.{wb}", o + "mlp.dense_h_to_4h.{wb}"),
            rename(s + "output_query.dense.{wb}", o + "mlp.dense_4h_to_h.{wb}"),
            # BERT normalizes at the end of a layer, SAT-order blocks at the start of the next
            rename(s + "output_query.LayerNorm.{wb}", nxt),
        ]
        if i % freq == 0:
            rules += [
                rename(s + "crossattention.self.query.{wb}", o + "cross_attention.query.{wb}"),
                convert((s + "crossattention.self.key.{wb}", s + "crossattention.self.value.{wb}"),
                        o + "cross_attention.key_value.{wb}", "concat"),
                rename(s + "crossattention.output.dense.{wb}", o + "cross_attention.dense.{wb}"),
                rename(s + "crossattention.output.LayerNorm.{wb}", o + "post_cross_attention_layernorm.{wb}"),
            ]
    return rules


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


# --- loading ------------------------------------------------------------------------------------------------

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


def _indices(sd: dict, prefix: str) -> set[int]:
    """The numbers N of keys ``prefix + "N." …`` (keys with anything else there are left to the rule table)."""
    idx = set()
    for k in sd:
        if isinstance(k, str) and k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit() and head.isascii() and len(head) < 6:
                idx.add(int(head))
    return idx


def _blocks(sd: dict, prefix: str) -> int:
    idx = _indices(sd, prefix + "blocks.")
    return max(idx) + 1 if idx else 0


def _layers(sd: dict, prefix: str) -> int:
    idx = _indices(sd, prefix)
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
        from modeling_visualglm.processing_minigpt4 import MiniGPT4Tokenizer

        if args.variant is not None and args.variant not in ("vicuna0", "llama2", "minigptv2"):
            raise UsageError(f"--variant must be vicuna0, llama2 or minigptv2, not {args.variant!r}")
        llm_dir = existing_dir(args.llm, "--llm")
        llm_cfg = _llm_config(read_json(llm_dir / "config.json"), f"{llm_dir}/config.json")
        ckpt_path = Path(args.ckpt)
        ckpt = _state_dict(ckpt_path, "--ckpt")
        notes = [f"MiniGPT-4 checkpoint {ckpt_path}, language model {llm_dir}"]
        if "llama_proj.weight" not in ckpt:
            raise ConversionError(f"--ckpt {ckpt_path} has no llama_proj.weight: not a MiniGPT-4 checkpoint "
                                  f"(found {sorted(map(str, ckpt))[:5]})")
        out_f, in_f = _tensor(ckpt, "llama_proj.weight", 2, f"--ckpt {ckpt_path}").shape
        has_lora = any(isinstance(k, str) and (".lora_A." in k or ".lora_B." in k) for k in ckpt)

        blip2 = _state_dict(Path(args.blip2), "--blip2") if args.blip2 else None
        vit_in_blip2 = blip2 is not None and "visual_encoder.cls_token" in blip2
        if args.vit is None and not vit_in_blip2:
            raise UsageError("--format minigpt4 needs --vit (eva_vit_g.pth) unless the --blip2 file holds the ViT")
        vit = _state_dict(Path(args.vit), "--vit") if args.vit else None
        vit_sd, vit_prefix = (blip2, "visual_encoder.") if vit_in_blip2 else (vit, "")
        if vit_prefix + "cls_token" not in vit_sd:
            raise ConversionError(f"{args.vit}: no cls_token: not an EVA ViT state dict")
        vit_what = f"--blip2 {args.blip2}" if vit_in_blip2 else f"--vit {args.vit}"
        vit_h = _tensor(vit_sd, vit_prefix + "cls_token", 3, vit_what).shape[-1]
        pos_embed = _tensor(vit_sd, vit_prefix + "pos_embed", 3, vit_what)
        patch_w = _tensor(vit_sd, vit_prefix + "patch_embed.proj.weight", 4, vit_what)
        fc1 = _tensor(vit_sd, vit_prefix + "blocks.0.mlp.fc1.weight", 2, vit_what)
        qf_h = (_tensor(blip2, "query_tokens", 3, f"--blip2 {args.blip2}").shape[-1]
                if blip2 is not None and "query_tokens" in blip2 else 768)

        # the variant, from the projector's shape (and LoRA keys), checked against --variant
        text_h = llm_cfg.get("hidden_size")
        if in_f == qf_h:
            inferred = "vicuna0"
        elif in_f == 4 * vit_h:
            inferred = "minigptv2" if has_lora else "llama2"
        else:
            raise ConversionError(
                f"--ckpt llama_proj.weight is {[out_f, in_f]}: in_features {in_f} fits no variant (Q-Former width "
                f"{qf_h} → vicuna0; 4 × ViT width {vit_h} = {4 * vit_h} → llama2 / minigptv2)")
        variant = args.variant or inferred
        if variant != inferred and not (variant in ("llama2", "minigptv2") and inferred in ("llama2", "minigptv2")
                                        and (variant == "minigptv2") == has_lora):
            raise ConversionError(f"--variant {variant} but the checkpoint is {inferred} (llama_proj in_features "
                                  f"{in_f}{', LoRA keys' if has_lora else ', no LoRA keys'})")
        if out_f != text_h:
            sizes = {5120: "13B", 4096: "7B"}
            raise ConversionError(
                f"--ckpt llama_proj.weight is {[out_f, in_f]}: it projects to {out_f} but the language model in "
                f"{llm_dir} has hidden_size {text_h}. This is the 7B/13B mix-up (MiniGPT-4#77): the checkpoint is "
                f"for a {sizes.get(out_f, str(out_f) + '-wide')} LLM, the folder holds a "
                f"{sizes.get(text_h, str(text_h) + '-wide')} one; use the matching pretrained_minigpt4*.pth")
        if variant == "vicuna0" and blip2 is None:
            raise UsageError("--variant vicuna0 needs --blip2 (the Q-Former and ln_vision)")

        # tokenizer and the placeholder row
        tok_dir = Path(args.tokenizer) if args.tokenizer else llm_dir
        tokenizer = load_tokenizer_folder(tok_dir.parent if tok_dir.is_file() else tok_dir, MiniGPT4Tokenizer)
        image_token_id = len(tokenizer)
        tokenizer.image_token_id = image_token_id
        tokenizer.init_kwargs["image_token_id"] = image_token_id
        rows = max(llm_cfg["vocab_size"], image_token_id + 1)
        if rows > llm_cfg["vocab_size"]:
            notes.append(f"one zero row added to embed_tokens/lm_head for the image placeholder id {image_token_id}")
        else:
            notes.append(f"image placeholder id {image_token_id}: the LLM's spare row (Vicuna-v0 [PAD])")

        # config
        n_blocks = _blocks(vit_sd, vit_prefix)
        depth = n_blocks if vit_in_blip2 else n_blocks - 1
        if vit_h == 1408 and depth != 39:
            raise ConversionError(f"the ViT has {n_blocks} blocks; BLIP-2's ViT-g runs 39 (eva_vit_g.pth has 40)")
        patch = patch_w.shape[-1]
        grid = int(round((pos_embed.shape[1] - 1) ** 0.5))
        if grid < 1 or grid * grid + 1 != pos_embed.shape[1]:
            raise ConversionError(f"{vit_what}: pos_embed has {pos_embed.shape[1]} rows, not CLS + a square grid")
        pos_grid = 2 * grid if variant == "minigptv2" else None
        if vit_h % VIT_HEAD_DIM:
            raise ConversionError(f"ViT width {vit_h} is not a multiple of EVA ViT-g's head dim {VIT_HEAD_DIM}")
        vision = dict(image_size=(pos_grid or grid) * patch, patch_size=patch, hidden_size=vit_h,
                      intermediate_size=fc1.shape[0],
                      num_hidden_layers=depth, num_attention_heads=vit_h // VIT_HEAD_DIM, layer_norm_eps=1e-6,
                      post_layernorm_eps=1e-5)
        qformer = None
        if variant == "vicuna0":
            n_q = _layers(blip2, "Qformer.bert.encoder.layer.")
            what = f"--blip2 {args.blip2}"
            if qf_h % BERT_HEAD_DIM or not n_q:
                raise ConversionError(f"{what}: a Q-Former of width {qf_h} with {n_q} layers is not BLIP-2's "
                                      f"(BERT-base heads of {BERT_HEAD_DIM})")
            inter = _tensor(blip2, "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight", 2, what).shape[0]
            qformer = dict(hidden_size=qf_h, num_hidden_layers=n_q, num_attention_heads=qf_h // BERT_HEAD_DIM,
                           intermediate_size=inter, num_query_tokens=_tensor(blip2, "query_tokens", 3, what).shape[1],
                           layer_norm_eps=1e-12, cross_attention_frequency=2)
        text = dict(vocab_size=rows, hidden_size=text_h, intermediate_size=llm_cfg["intermediate_size"],
                    num_hidden_layers=llm_cfg["num_hidden_layers"], num_attention_heads=llm_cfg["num_attention_heads"],
                    num_key_value_heads=llm_cfg["num_key_value_heads"], rms_norm_eps=llm_cfg["rms_norm_eps"],
                    rope_theta=llm_cfg["rope_theta"], max_position_embeddings=llm_cfg["max_position_embeddings"],
                    use_visual_experts=False, bos_token_id=1, eos_token_id=2, pad_token_id=None)
        config = build_config(MiniGPT4Config, f"MiniGPT-4 {variant}", variant=variant, vision_config=vision,
                              qformer_config=qformer, text_config=text, image_token_id=image_token_id)

        # sources and rules
        parts = {"ckpt": _source("--ckpt", ckpt_path, ckpt), "llm": hf_folder_source(llm_dir)}
        rules = [rename("ckpt.llama_proj.{wb}", "llama_proj.{wb}")]
        if variant == "vicuna0":
            parts["blip2"] = _source("--blip2", args.blip2, blip2)
            rules += qformer_rules(qformer["num_hidden_layers"])
            rules += [rename("blip2.ln_vision.{wb}", "vision_model.post_layernorm.{wb}"),
                      drop("blip2.{head:t5_proj|opt_proj}.{wb}", "BLIP-2's projection to its own LLM; MiniGPT-4 "
                           "trains llama_proj instead")]
        else:
            fresh = {"ln_vision.weight": torch.ones(vit_h), "ln_vision.bias": torch.zeros(vit_h)}
            parts["fresh"] = _source("fresh init", "(ln_vision, never loaded by the LLaMA-2 code)", fresh)
            rules.append(rename("fresh.ln_vision.{wb}", "vision_model.post_layernorm.{wb}"))
            notes.append("ln_vision at its fresh init (weight 1, bias 0): the LLaMA-2 / v2 code never loads one")
        if vit_in_blip2:
            rules += vit_rules("blip2.visual_encoder.", n_blocks, depth, pos_grid)
            if vit is not None:
                notes.append(f"--vit {args.vit} ignored: the BLIP-2 file's ViT is loaded over eva_vit_g.pth")
        else:
            parts["vit"] = _source("--vit", args.vit, vit)
            rules += vit_rules("vit.", n_blocks, depth, pos_grid)
        rules += llm_rules(rows, lora=variant == "minigptv2")
        if variant == "minigptv2":
            notes.append(f"LoRA merged into q_proj/v_proj (lora_alpha {LORA_ALPHA} / r); ViT positions interpolated "
                         f"{grid}x{grid} → {pos_grid}x{pos_grid}")
        source = PrefixedSource(parts, description=f"MiniGPT-4 {variant} ({', '.join(parts)})")
        return Loaded(source=source, rules=rules, config=config, model_class=MiniGPT4ForConditionalGeneration,
                      family=MINIGPT4, tokenizer=tokenizer, notes=notes)
