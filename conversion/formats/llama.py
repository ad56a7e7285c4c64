"""LLaMA-1/2 from Meta's original release → a plain transformers Llama folder (``--format llama-original``).

Source: a folder with ``consolidated.00.pth`` … ``consolidated.NN.pth`` (one file per model-parallel rank;
7B 1, 13B 2, 33B/34B 4, 65B/70B 8), ``params.json`` and ``tokenizer.model`` (SentencePiece; Meta's
downloads keep it one level up, beside the size folders, which is searched too). Facts from
facebookresearch/llama ``llama/model.py`` (Llama-2) and transformers' ``convert_llama_weights_to_hf.py``
(4.45.2, the last wheel that ships it; spec minigpt4.md §4), which the tests reproduce bit for bit:

- each rank holds a slice of every fairscale layer: ColumnParallelLinear (wq, wk, wv, w1, w3, output) splits
  the output rows → concatenate on dim 0; RowParallelLinear (wo, w2) splits the input columns → dim 1;
  ParallelEmbedding (tok_embeddings) splits the embedding dim → dim 1 (a vocabulary split, dim 0, is read
  from the shapes); norms are replicated (checked equal, shard 0 taken);
- q and k rows are permuted per head from Meta's interleaved rotary pairs to ``rotate_half`` order
  (``rope_permute``), k with ``n_kv_heads`` (GQA);
- ``intermediate_size`` = multiple_of · ⌈int(ffn_dim_multiplier · int(8·dim/3)) / multiple_of⌉;
- ``rope.freqs`` (a precomputed complex buffer in some files) is dropped.

Deliberate differences from transformers' script: tensors keep their source dtype (``--dtype`` casts; the
script always saves bfloat16), shards are memory-mapped and assembled tensor by tensor instead of all
loaded into RAM, there is no ``--llama_version`` (``max_position_embeddings`` follows from ``params.json``,
see :func:`max_positions`), and the vocabulary size comes from the embedding's rows (checked against the
tokenizer) rather than from the tokenizer alone.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConversionError
from ..plain import TokenizerFiles
from ..rules import convert, drop, rename
from ..sources import (SPM_FILE, TOKENIZER_JSON, PrefixedSource, closed_on_error, find_tokenizer, load_tokenizer_folder,
                       read_json_object, torch_file_source)
from ..validate import MAX_LAYERS, MAX_POSITIONS, MAX_WIDTH, Fields, build_config, is_int, raise_if
from .base import Format, Loaded, existing_dir

_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
# the ids every LLaMA-1/2 SentencePiece model (and so Vicuna's) assigns its special pieces
SPECIAL_PIECES = {0: "<unk>", 1: "<s>", 2: "</s>"}


# --- rule table -------------------------------------------------------------------------------------------

def meta_rules(parts: list[str], *, n_heads: int, n_kv_heads: int, embed_dim: int) -> list:
    """Rules over shard-prefixed names (``consolidated.00.layers.0.attention.wq.weight``)."""
    if len(parts) == 1:  # one rank: plain renames, q/k permuted
        p = parts[0] + "."
        rules = [
            rename(p + "tok_embeddings.weight", "model.embed_tokens.weight"),
            rename(p + "norm.weight", "model.norm.weight"),
            rename(p + "output.weight", "lm_head.weight"),
            convert(p + "layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight",
                    "rope_permute", num_heads=n_heads),
            convert(p + "layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight",
                    "rope_permute", num_heads=n_kv_heads),
            rename(p + "layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
            rename(p + "layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
            rename(p + "layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
            rename(p + "layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
            rename(p + "layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
            rename(p + "layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
            rename(p + "layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
        ]
    else:
        def each(name):
            return tuple(f"{part}.{name}" for part in parts)

        def mp(name, target, dim, **kw):
            return convert(each(name), target, "concat_mp_shards", dim=dim, **kw)

        rules = [
            # ParallelEmbedding splits the embedding dim (LLaMA-1/2); a vocabulary split shows as dim 0
            mp("tok_embeddings.weight", "model.embed_tokens.weight", embed_dim),
            convert(each("norm.weight"), "model.norm.weight", "replicated"),
            mp("output.weight", "lm_head.weight", 0),  # ColumnParallelLinear: vocabulary rows
            mp("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight", 0, rope_heads=n_heads),
            mp("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight", 0, rope_heads=n_kv_heads),
            mp("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight", 0),
            mp("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", 1),  # RowParallel
            mp("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight", 0),
            mp("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight", 1),  # RowParallel
            mp("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight", 0),
            convert(each("layers.{i}.attention_norm.weight"), "model.layers.{i}.input_layernorm.weight", "replicated"),
            convert(each("layers.{i}.ffn_norm.weight"), "model.layers.{i}.post_attention_layernorm.weight",
                    "replicated"),
        ]
    rules.append(drop("{part:" + "|".join(parts) + "}.rope.freqs",
                      "Meta's precomputed rotary angles (complex buffer); transformers recomputes them from rope_theta"))
    return rules


# --- config -----------------------------------------------------------------------------------------------

def intermediate_size(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's FeedForward width: int(2·4·dim/3), times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(8 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def max_positions(params: dict) -> tuple[int, str]:
    """``max_position_embeddings`` and why: params.json has no context length (it is a runtime argument).

    transformers' script asks for ``--llama_version``; the released params.json files tell the versions
    apart by ``norm_eps`` (LLaMA-1 1e-6 → 2048, Llama-2 1e-5 → 4096) and Code Llama by ``rope_theta``
    (1e6 → 16384, the script's rule). It only bounds the prompt length transformers expects; rotary angles
    do not depend on it.
    """
    if is_int(params.get("max_seq_len")) and params["max_seq_len"] > 0:
        return params["max_seq_len"], "params.json max_seq_len"
    if (params.get("rope_theta") or 10000.0) > 10000.0:
        return 16384, "rope_theta > 10000 (Code Llama)"
    if params.get("norm_eps") == 1e-6:
        return 2048, "norm_eps 1e-6 (LLaMA-1)"
    return 4096, f"norm_eps {params.get('norm_eps')} (Llama-2)"


def read_params(params, where: str, problems: list[str], vocab_size: int | None = None) -> dict:
    """The fields of ``params.json`` the config needs, type-, range- and relation-checked (problems appended)."""
    f = Fields(params, where, problems)
    p = dict(
        dim=f.int("dim", max=MAX_WIDTH),
        n_layers=f.int("n_layers", max=MAX_LAYERS),
        n_heads=f.int("n_heads", max=MAX_WIDTH),
        norm_eps=f.number("norm_eps", required=True, max=1.0),
        multiple_of=f.int("multiple_of", default=256, max=MAX_WIDTH),
        ffn_dim_multiplier=f.number("ffn_dim_multiplier", default=None, required=False, max=64.0),
        rope_theta=f.number("rope_theta", default=10000.0),
    )
    p["n_kv_heads"] = f.int("n_kv_heads", default=p["n_heads"], required=False, max=MAX_WIDTH)
    declared = f.data.get("vocab_size", -1)
    if declared not in (-1, None) and (not is_int(declared) or declared < 1):
        problems.append(f"{where}: vocab_size must be -1 or an integer >= 1, got {declared!r}")
    elif declared not in (-1, None) and vocab_size is not None and declared != vocab_size:
        problems.append(f"{where}: vocab_size {declared} but tok_embeddings has {vocab_size} rows")
    if f.has("max_seq_len"):
        f.int("max_seq_len", max=MAX_POSITIONS)
    if f.bool("use_scaled_rope", default=False):
        problems.append(f"{where}: use_scaled_rope (Llama 3.1 rope scaling) is not supported; "
                        "this converter handles LLaMA-1/2 and Code Llama")
    dim, n_heads, n_kv = p["dim"], p["n_heads"], p["n_kv_heads"]
    if f.divisible("dim", dim, "n_heads", n_heads) and dim and n_heads and (dim // n_heads) % 2:
        problems.append(f"{where}: head dim {dim // n_heads} is odd; rotary embeddings need an even one")
    if n_heads and n_kv and n_heads % n_kv:
        problems.append(f"{where}: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv}")
    if dim and p["multiple_of"] and not problems:
        inter = intermediate_size(dim, p["multiple_of"], p["ffn_dim_multiplier"])
        if not 1 <= inter <= MAX_WIDTH:
            problems.append(f"{where}: the feed-forward width {inter} (from dim, multiple_of, ffn_dim_multiplier) is "
                            "out of range")
    return p


def llama_config_from_params(params: dict, *, vocab_size: int, bos_token_id: int, eos_token_id: int,
                             where: str):
    """``LlamaConfig`` from Meta's ``params.json``; returns (config, notes). Types, ranges and relations are
    checked first (:func:`read_params`); every problem is reported in one ``ConversionError``."""
    from transformers import LlamaConfig

    problems: list[str] = []
    p = read_params(params, where, problems, vocab_size)
    dim, n_heads, n_kv = p["dim"], p["n_heads"], p["n_kv_heads"]
    raise_if(problems, f"cannot build a Llama config from {where}")
    max_pos, why = max_positions(params)
    inter = intermediate_size(dim, p["multiple_of"], p["ffn_dim_multiplier"])
    config = build_config(
        LlamaConfig, where,
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=inter,
        num_hidden_layers=p["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        rms_norm_eps=p["norm_eps"],
        max_position_embeddings=max_pos,
        rope_parameters={"rope_type": "default", "rope_theta": p["rope_theta"]},
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    notes = [
        f"intermediate_size {inter} = multiple_of {p['multiple_of']} rounding of "
        f"int({params.get('ffn_dim_multiplier', 1)} x int(8 x {dim} / 3))",
        f"max_position_embeddings {max_pos} from {why}; edit config.json if your model differs",
    ]
    return config, notes


# --- tokenizer --------------------------------------------------------------------------------------------

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes):
    """(field number, value) of one protobuf message, wire format only (no protobuf dependency)."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def spm_settings(sp) -> dict:
    """model_type, byte_fallback, normalizer name and whitespace handling of a SentencePiece model.

    Read from the serialized ModelProto (trainer_spec = field 2: model_type 3, byte_fallback 35;
    normalizer_spec = field 3: name 1, add_dummy_prefix 3, remove_extra_whitespaces 4) with their proto
    defaults: transformers' own reader needs the protobuf package, and the LLaMA formats work without it
    (``pip install --no-deps`` setups, broken protobuf installs).
    """
    out = {"model_type": 1, "byte_fallback": False, "normalizer": "nmt_nfkc", "add_dummy_prefix": True,
           "remove_extra_whitespaces": True}
    for number, value in _proto_fields(sp.serialized_model_proto()):
        if number == 2:
            for n, v in _proto_fields(value):
                if n == 3:
                    out["model_type"] = v
                elif n == 35:
                    out["byte_fallback"] = bool(v)
        elif number == 3:
            for n, v in _proto_fields(value):
                if n == 1:
                    out["normalizer"] = v.decode("utf-8", "replace")
                elif n == 3:
                    out["add_dummy_prefix"] = bool(v)
                elif n == 4:
                    out["remove_extra_whitespaces"] = bool(v)
    return out


def find_llama_tokenizer(explicit: str | None, fallback_dirs: list[Path],
                         notes: list[str]) -> tuple[Path, TokenizerFiles] | None:
    """(the file read, the tokenizer) from ``--tokenizer`` (a ``tokenizer.model`` or a tokenizer folder), else from
    the first fallback folder that holds a tokenizer; None when there is none.

    A ``tokenizer.model`` wins over a ``tokenizer.json`` beside it (also when ``--tokenizer`` names the json) and is
    read by :func:`llama_tokenizer` (no protobuf); a folder with only ``tokenizer.json`` loads as transformers'
    ``LlamaTokenizer``.
    """
    if explicit is not None and Path(explicit).suffix == ".json" and Path(explicit).is_file():
        explicit = str(Path(explicit).parent)
    path = find_tokenizer(explicit, fallback_dirs, (SPM_FILE, TOKENIZER_JSON))
    if path is None:
        return None
    if path.suffix == ".json":
        return path, json_llama_tokenizer(path.parent)
    return path, llama_tokenizer(path, notes)


def json_llama_tokenizer(folder: Path) -> TokenizerFiles:
    """transformers' ``LlamaTokenizer`` from a folder's ``tokenizer.json``, with LLaMA's special pieces and BOS
    (also where the folder's config blanked them, FastChat#408), checked at LLaMA's ids."""
    from transformers import LlamaTokenizer

    tokenizer = load_tokenizer_folder(folder, LlamaTokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                      add_bos_token=True, add_eos_token=False)
    problems = [f"{folder}/{TOKENIZER_JSON}: token {i} is {tokenizer.convert_ids_to_tokens(i)!r}, LLaMA's is {piece!r}"
                for i, piece in SPECIAL_PIECES.items() if tokenizer.convert_ids_to_tokens(i) != piece]
    if problems:
        raise ConversionError(problems, header=f"{folder}/{TOKENIZER_JSON} is not a LLaMA tokenizer")
    return TokenizerFiles(tokenizer)


def llama_tokenizer(spm_path: Path, notes: list[str]) -> TokenizerFiles:
    """transformers' ``LlamaTokenizer`` (tokenizers backend) built from a LLaMA SentencePiece BPE model.

    The vocabulary and scores are read with ``sentencepiece`` and the merges rebuilt with transformers'
    ``generate_merges`` (what its protobuf-based extractor does). The ``.model`` file is copied too: code
    that needs SentencePiece's own ids (MiniGPT-4's legacy prompts, spec minigpt4.md §8) reads it.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    try:
        sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    except (OSError, RuntimeError) as e:
        raise ConversionError(f"{spm_path}: not a SentencePiece model ({str(e).strip()[:200]}); Llama 3's "
                              "tiktoken tokenizer.model is not supported") from None
    n = sp.get_piece_size()
    problems = [f"{spm_path}: piece {i} is {sp.id_to_piece(i)!r}, LLaMA's is {piece!r}"
                for i, piece in SPECIAL_PIECES.items() if i >= n or sp.id_to_piece(i) != piece]
    settings = spm_settings(sp)
    if settings["model_type"] != 2:
        problems.append(f"{spm_path}: a SentencePiece model of type {settings['model_type']} (1 unigram, 3 word, "
                        "4 char); LLaMA's is BPE (2)")
    if problems:
        raise ConversionError(problems, header=f"{spm_path} is not a LLaMA tokenizer")
    if (settings["normalizer"], settings["remove_extra_whitespaces"]) != ("identity", False):
        notes.append(f"{spm_path.name}: normalizer {settings['normalizer']!r}, remove_extra_whitespaces="
                     f"{settings['remove_extra_whitespaces']} (LLaMA's: 'identity', False); tokenizer.json "
                     "follows LLaMA's and may differ from SentencePiece on such text")
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(n)}
    merges = generate_merges(vocab, scores, skip_tokens=set(SPECIAL_PIECES.values()))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                               add_bos_token=True, add_eos_token=False)  # LLaMA's: BOS on every sequence
    return TokenizerFiles(tokenizer, copy=(spm_path,))


# --- format -----------------------------------------------------------------------------------------------

def meta_shards(src: Path) -> list[Path]:
    found = sorted(p for p in src.iterdir() if _SHARD.fullmatch(p.name))
    if not found:
        others = sorted(p.name for p in src.iterdir() if p.suffix in (".pth", ".pt", ".bin", ".safetensors"))
        raise ConversionError(f"{src}: no consolidated.NN.pth files (Meta's original LLaMA layout)"
                              + (f"; found {others[:5]}" if others else ""))
    numbers = [int(_SHARD.fullmatch(p.name).group(1)) for p in found]
    if numbers != list(range(len(found))):
        raise ConversionError(f"{src}: model-parallel files {[p.name for p in found]} are not numbered "
                              f"00..{len(found) - 1:02d} (a rank is missing)")
    return found


def _tokenizer(explicit: str | None, src: Path, vocab: int, notes: list[str]) -> TokenizerFiles | None:
    """``--tokenizer``, else the ``tokenizer.model`` beside the weights or one level up (Meta's downloads)."""
    found = find_llama_tokenizer(explicit, [src, src.parent], notes)
    if found is None:
        notes.append(f"no {SPM_FILE} in {src} or {src.parent}: the folder has no tokenizer (pass --tokenizer)")
        return None
    tok_path, tokenizer = found
    pieces = len(tokenizer.tokenizer)
    if pieces > vocab:
        raise ConversionError(f"{tok_path} has {pieces} pieces but tok_embeddings only {vocab} rows "
                              "(wrong tokenizer?)")
    notes.append(f"tokenizer {tok_path} ({pieces} pieces) → {TOKENIZER_JSON}" + (f" + {SPM_FILE}" if tokenizer.copy else ""))
    return tokenizer


class LlamaOriginal(Format):
    name = "llama-original"
    help = ("Meta's original LLaMA-1/2 release (--src with consolidated.NN.pth, params.json, tokenizer.model) "
            "→ plain transformers Llama folder")
    required_flags = ("src",)

    def load(self, args) -> Loaded:
        from transformers import LlamaForCausalLM

        src = existing_dir(args.src, "--src")
        params = read_json_object(src / "params.json")
        if isinstance(params.get("model"), dict):  # some re-exports nest the arguments
            params = params["model"]
        problems: list[str] = []
        read_params(params, f"{src}/params.json", problems)  # before any tensor is read
        raise_if(problems, f"cannot build a Llama config from {src}/params.json")
        files = meta_shards(src)
        parts = [p.name[: -len(".pth")] for p in files]  # "consolidated.00", …
        sources = {}
        try:
            for part, path in zip(parts, files):
                sources[part] = torch_file_source(path)
        except ConversionError:
            for s in sources.values():
                s.close()
            raise
        source = PrefixedSource(sources, description=f"{src} ({len(files)} model-parallel file(s))")
        notes = [f"Meta checkpoint {src}: {len(files)} model-parallel file(s) {', '.join(p.name for p in files)}"]
        with closed_on_error(source):
            embed_dim, vocab = self._embedding_split(source, parts, params, src)
            tokenizer = _tokenizer(args.tokenizer, src, vocab, notes)
            config, config_notes = llama_config_from_params(params, vocab_size=vocab, bos_token_id=1,
                                                            eos_token_id=2, where=f"{src}/params.json")
            notes += config_notes
            n_kv = config.num_key_value_heads
            if len(parts) > 1 and (config.num_attention_heads % len(parts) or n_kv % len(parts)):
                raise ConversionError(f"{src}: {config.num_attention_heads} heads / {n_kv} kv heads do not split "
                                      f"evenly over {len(parts)} model-parallel files")
            rules = meta_rules(parts, n_heads=config.num_attention_heads, n_kv_heads=n_kv, embed_dim=embed_dim)
        if len(parts) > 1:
            notes.append(f"tok_embeddings concatenated on dim {embed_dim} "
                         + ("(embedding dim split, LLaMA-1/2)" if embed_dim == 1 else "(vocabulary split)"))
        return Loaded(source=source, rules=rules, config=config, model_class=LlamaForCausalLM, family=None,
                      tokenizer=tokenizer, notes=notes)

    @staticmethod
    def _embedding_split(source, parts, params, src) -> tuple[int, int]:
        """(concat dim of tok_embeddings, vocabulary rows), from the shard shapes and params.json's dim."""
        key = f"{parts[0]}.tok_embeddings.weight"
        if key not in source:
            raise ConversionError(f"{src}/{parts[0]}.pth has no tok_embeddings.weight: not a Meta LLaMA checkpoint")
        shape = source.info(key).shape
        if len(shape) != 2:
            raise ConversionError(f"{src}/{parts[0]}.pth: tok_embeddings.weight is {list(shape)}, not a 2-D table")
        rows, cols = shape
        dim = params.get("dim")
        if len(parts) == 1:
            return 1, rows
        if cols * len(parts) == dim:
            return 1, rows
        if cols == dim:
            return 0, sum(source.info(f"{p}.tok_embeddings.weight").shape[0]
                          for p in parts if f"{p}.tok_embeddings.weight" in source)
        raise ConversionError(f"{src}: tok_embeddings slices are [{rows}, {cols}] over {len(parts)} files, which "
                              f"split neither dim {dim} nor the vocabulary")
