"""Vicuna from FastChat delta weights → a plain transformers Llama folder (``--format fastchat-delta``).

``--base DIR`` is a transformers LLaMA folder (e.g. the output of ``--format llama-original``), ``--delta DIR``
one of lm-sys' delta releases (``lmsys/vicuna-7b-delta-v1.1``, ``…-delta-v0``). Each target tensor is
base + delta, as FastChat's ``fastchat/model/apply_delta.py`` computes it (spec minigpt4.md §3):

- v1.1 and later (FastChat ≥ 0.2.1, e.g. 0.2.36): a plain add of every tensor, in float16 (both models are
  loaded with ``torch_dtype=float16`` and added in place);
- v0 (FastChat ≤ 0.1.10, commit f34f28ce): the base gets a ``[PAD]`` row (32000 → 32001) in both
  ``embed_tokens`` and ``lm_head``, set to zero, then the add. Here: whenever only the vocabulary rows of
  those two tensors differ and the delta has more, the base is zero-padded to the delta's rows.

Any other difference (another model size, a missing layer, a smaller delta vocabulary) is an error before
anything is written. Weights are read memory-mapped, tensor by tensor, from safetensors (sharded or not) or
``.bin`` files (sharded with an index, or single) — FastChat's ``--low-cpu-mem`` path only globs sharded
``.bin`` files, and its normal path holds both models in RAM (≈30 GB for 7B).

Repairs (each printed as a note): ``LLaMATokenizer``/``LLaMAForCausalLM`` casing of early HF conversions
(the tokenizer files are written anew by transformers' ``LlamaTokenizer``), empty special tokens in
``special_tokens_map.json``, and config token ids of early conversions (bos 0 / eos 1 / pad -1) → 1 / 2 /
none, the ids of LLaMA's SentencePiece model.

Deliberate differences: the sum is stored in the delta's dtype (float16 for every release, so identical to
FastChat) unless ``--dtype`` asks for another, in which case both operands are cast to it before the add
(``--dtype float32`` gives the exact sum). The config is the base's architecture with the delta's vocabulary
size, as FastChat's normal path saves it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConversionError
from ..rules import convert, drop
from ..sources import PrefixedSource, closed_on_error, hf_folder_source, read_json_object
from ..validate import MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, Fields, build_config
from .base import Format, Loaded, existing_dir
from .llama import SPECIAL_PIECES, find_llama_tokenizer

# architecture fields a delta must share with its base
ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def delta_rules(dtype: str | None) -> list:
    kw = {"dtype": dtype} if dtype else {}
    pair = lambda name: ("base." + name, "delta." + name)  # noqa: E731
    return [
        # the vocabulary tensors may differ in rows (Vicuna v0: 32000 base rows, 32001 delta rows)
        convert(pair("model.embed_tokens.weight"), "model.embed_tokens.weight", "add_delta", pad_rows=True, **kw),
        convert(pair("lm_head.weight"), "lm_head.weight", "add_delta", pad_rows=True, **kw),
        convert(pair("model.layers.{i}.self_attn.{p:q_proj|k_proj|v_proj|o_proj}.weight"),
                "model.layers.{i}.self_attn.{p}.weight", "add_delta", **kw),
        convert(pair("model.layers.{i}.mlp.{p:gate_proj|up_proj|down_proj}.weight"),
                "model.layers.{i}.mlp.{p}.weight", "add_delta", **kw),
        convert(pair("model.layers.{i}.{n:input_layernorm|post_attention_layernorm}.weight"),
                "model.layers.{i}.{n}.weight", "add_delta", **kw),
        convert(pair("model.norm.weight"), "model.norm.weight", "add_delta", **kw),
        drop("{side:base|delta}.model.layers.{i}.self_attn.rotary_emb.inv_freq",
             "rotary buffer of transformers < 4.31 conversions (the delta's is 0); recomputed from rope_theta"),
    ]


def _checked(cfg: dict, where: str, problems: list[str], required: bool) -> dict:
    """Type/range/relation checks of a transformers Llama ``config.json``; returns the architecture fields."""
    f = Fields(cfg, where, problems)
    arch = dict(
        hidden_size=f.int("hidden_size", required=required, max=MAX_WIDTH),
        intermediate_size=f.int("intermediate_size", required=required, max=MAX_WIDTH),
        num_hidden_layers=f.int("num_hidden_layers", required=required, max=MAX_LAYERS),
        num_attention_heads=f.int("num_attention_heads", required=required, max=MAX_WIDTH),
    )
    arch["num_key_value_heads"] = f.int("num_key_value_heads", default=arch["num_attention_heads"], required=False,
                                        max=MAX_WIDTH)
    hidden, heads, kv = arch["hidden_size"], arch["num_attention_heads"], arch["num_key_value_heads"]
    if f.divisible("hidden_size", hidden, "num_attention_heads", heads) and hidden and heads and (hidden // heads) % 2:
        problems.append(f"{where}: head dim {hidden // heads} is odd; rotary embeddings need an even one")
    f.divisible("num_attention_heads", heads, "num_key_value_heads", kv)
    f.number("rms_norm_eps", default=1e-6, max=1.0)
    f.number("rope_theta", default=10000.0)
    f.number("initializer_range", default=0.02, max=10.0)
    f.int(("max_position_embeddings", "max_sequence_length"), default=2048, max=MAX_POSITIONS)
    f.int("vocab_size", required=False, max=MAX_VOCAB)
    for key in ("bos_token_id", "eos_token_id"):
        f.int(key, required=False, min=0, max=MAX_VOCAB)
    f.int("pad_token_id", required=False, min=-1, max=MAX_VOCAB)  # -1: early conversions' "none"
    f.str("model_type")
    f.str("hidden_act")
    for key in ("rope_scaling", "rope_parameters"):
        if f.has(key):
            f.section(key)
    if f.has("architectures") and not (isinstance(cfg["architectures"], list)
                                       and all(isinstance(a, str) for a in cfg["architectures"])):
        problems.append(f"{where}: architectures must be a list of strings, got {cfg['architectures']!r}")
    return arch


def check_configs(base_cfg: dict, delta_cfg: dict | None, base_dir: Path, delta_dir: Path, notes: list[str]):
    problems: list[str] = []
    base_arch = _checked(base_cfg, f"{base_dir}/config.json", problems, required=True)
    delta_arch = _checked(delta_cfg, f"{delta_dir}/config.json", problems, required=False) \
        if delta_cfg is not None else None
    if problems:
        raise ConversionError(problems, header="the base and delta do not form a Vicuna model")
    for name, cfg in (("base", base_cfg), ("delta", delta_cfg)):
        if cfg is None:
            continue
        if cfg.get("model_type") != "llama":
            problems.append(f"{name} config.json: model_type {cfg.get('model_type')!r}, not 'llama'")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                problems.append(f"{name} config.json: {flag}=true is not LLaMA/Vicuna; unsupported")
        if cfg.get("hidden_act", "silu") != "silu":
            problems.append(f"{name} config.json: hidden_act {cfg['hidden_act']!r}, LLaMA's is 'silu'")
        arch = cfg.get("architectures") or []
        if "LLaMAForCausalLM" in arch:
            notes.append(f"{name} config.json says LLaMAForCausalLM (early HF conversion): written as LlamaForCausalLM")
    if delta_arch is not None:
        diff = [f"{k}: base {base_arch[k]}, delta {delta_arch[k]}" for k in ARCH_FIELDS
                if delta_arch[k] is not None and base_arch[k] != delta_arch[k]]
        if diff:
            problems.append(f"the delta in {delta_dir} is for a different model than the base in {base_dir} ("
                            + "; ".join(diff) + ")")
    else:
        notes.append(f"{delta_dir} has no config.json: the delta is checked against the base by tensor shapes only")
    if problems:
        raise ConversionError(problems, header="the base and delta do not form a Vicuna model")


def repair_notes(folder: Path, notes: list[str]):
    """Record what the tokenizer files of an early conversion got wrong (the output is written anew)."""
    tok_cfg = read_json_object(folder / "tokenizer_config.json", required=False) or {}
    if tok_cfg.get("tokenizer_class") == "LLaMATokenizer":
        notes.append(f"{folder.name}/tokenizer_config.json says LLaMATokenizer (transformers#22222): "
                     "written as LlamaTokenizer")
    special = read_json_object(folder / "special_tokens_map.json", required=False) or {}
    for key, piece in (("unk_token", "<unk>"), ("bos_token", "<s>"), ("eos_token", "</s>")):
        value = special.get(key, tok_cfg.get(key))
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None and value != piece:
            notes.append(f"{folder.name}: {key} was {value!r}: set to {piece!r} (FastChat#408: blank special "
                         "tokens make generation endless)")


def vicuna_config(base_cfg: dict, *, vocab_size: int, where: str, notes: list[str]):
    """LlamaConfig with the base's architecture, the delta's vocabulary and LLaMA's special-token ids."""
    from transformers import LlamaConfig

    rope = base_cfg.get("rope_parameters")
    if not rope:
        rope = {"rope_type": "default", "rope_theta": float(base_cfg.get("rope_theta") or 10000.0)}
        scaling = base_cfg.get("rope_scaling")
        if scaling:
            scaling = dict(scaling)
            rope["rope_type"] = scaling.pop("rope_type", scaling.pop("type", "default"))
            rope.update(scaling)
    # early conversions wrote max_sequence_length instead
    max_pos = base_cfg.get("max_position_embeddings") or base_cfg.get("max_sequence_length") or 2048
    ids = {k: base_cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    want = {"bos_token_id": 1, "eos_token_id": 2}
    if any(ids[k] is not None and ids[k] != v for k, v in want.items()) or ids["pad_token_id"] == -1:
        notes.append(f"{where}: token ids bos {ids['bos_token_id']} / eos {ids['eos_token_id']} / pad "
                     f"{ids['pad_token_id']} (an early HF conversion; MiniGPT-4#339): written as 1 / 2 / none")
    pad = ids["pad_token_id"] if ids["pad_token_id"] not in (-1, None) and ids["pad_token_id"] < vocab_size else None
    return build_config(
        LlamaConfig, where,
        vocab_size=vocab_size,
        hidden_size=base_cfg["hidden_size"],
        intermediate_size=base_cfg["intermediate_size"],
        num_hidden_layers=base_cfg["num_hidden_layers"],
        num_attention_heads=base_cfg["num_attention_heads"],
        num_key_value_heads=base_cfg.get("num_key_value_heads") or base_cfg["num_attention_heads"],
        rms_norm_eps=base_cfg.get("rms_norm_eps") or 1e-6,
        max_position_embeddings=max_pos,
        rope_parameters=rope,
        initializer_range=base_cfg.get("initializer_range") or 0.02,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad if pad not in (1, 2) else None,
        tie_word_embeddings=False,
    )


class FastChatDelta(Format):
    name = "fastchat-delta"
    help = ("FastChat/Vicuna delta weights (--base DIR: transformers LLaMA folder, --delta DIR: lmsys delta, v0 or "
            "v1.1) → plain transformers Llama folder")
    required_flags = ("base", "delta")

    def load(self, args) -> Loaded:
        from transformers import LlamaForCausalLM

        base_dir = existing_dir(args.base, "--base")
        delta_dir = existing_dir(args.delta, "--delta")
        notes = [f"base {base_dir}, delta {delta_dir}"]
        base_cfg = read_json_object(base_dir / "config.json", required=True)
        delta_cfg = read_json_object(delta_dir / "config.json", required=False)
        check_configs(base_cfg, delta_cfg, base_dir, delta_dir, notes)
        base_src = hf_folder_source(base_dir)
        try:
            delta_src = hf_folder_source(delta_dir)
        except ConversionError:
            base_src.close()
            raise
        source = PrefixedSource({"base": base_src, "delta": delta_src}, description=f"{base_dir} + delta {delta_dir}")
        with closed_on_error(source):
            rows = {}
            for side, src in (("base", base_src), ("delta", delta_src)):
                key = "model.embed_tokens.weight"
                if key not in src:
                    raise ConversionError(f"the {side} in {src.description} has no {key}: not a transformers LLaMA")
                rows[side] = src.info(key).shape[0]
            if rows["delta"] < rows["base"]:
                raise ConversionError(
                    f"the delta's embed_tokens has {rows['delta']} rows, fewer than the base's {rows['base']}: "
                    "FastChat deltas have the base's vocabulary (v1.1) or more rows (v0: one [PAD] row)")
            if rows["delta"] > rows["base"]:
                notes.append(f"vocabulary: base {rows['base']} rows zero-padded to the delta's {rows['delta']} "
                             "before the add (Vicuna v0, FastChat v0.1.10)")
            found = find_llama_tokenizer(args.tokenizer, [delta_dir, base_dir], notes)
            tokenizer = None
            if found is not None:
                tok_path, tokenizer = found
                repair_notes(tok_path.parent, notes)
                pieces = len(tokenizer.tokenizer)
                if pieces > rows["delta"]:
                    raise ConversionError(f"{tok_path} has {pieces} pieces but the model only {rows['delta']} rows "
                                          "(wrong tokenizer?)")
                notes.append(f"tokenizer {tok_path} ({pieces} pieces; special ids "
                             + ", ".join(f"{p}={i}" for i, p in SPECIAL_PIECES.items()) + ")")
            else:
                notes.append(f"no tokenizer.model or tokenizer.json in {delta_dir} or {base_dir}: the folder has no "
                             "tokenizer")
            config = vicuna_config(base_cfg, vocab_size=rows["delta"], where=f"{base_dir}/config.json", notes=notes)
            dtype = None if args.dtype in (None, "keep") else args.dtype
            notes.append(f"sum computed in {dtype or 'the delta dtype'}"
                         + (" (FastChat: float16)" if dtype is None else " (both operands cast first)"))
            rules = delta_rules(dtype)
        return Loaded(source=source, rules=rules, config=config, model_class=LlamaForCausalLM, family=None,
                      tokenizer=tokenizer, notes=notes)
