"""A tiny Llama tokenizer for CogVLM tests: a SentencePiece BPE model (byte fallback, ids 0-2 = <unk> <s> </s>,
like Vicuna's) trained in about a second on a generated English corpus, loaded into transformers' standard
``LlamaTokenizer`` (tokenizers backend) without protobuf: pieces and scores are read through
``SentencePieceProcessor`` and the merges rebuilt with transformers' ``generate_merges``.
"""

from __future__ import annotations

import itertools

import sentencepiece as spm

VOCAB_SIZE = 400  # 3 specials + 256 byte pieces + learned pieces

_WORDS = ("the a cat dog sat on mat picture of what is this there red blue box person car tree sky left right "
          "question answer short user assistant chat hello hi image describe color many how where which").split()


def _corpus():
    sentences = []
    for i, (a, b, c) in enumerate(itertools.product(_WORDS[:12], _WORDS[8:20], _WORDS[16:])):
        if i % 7 == 0:
            sentences.append(f"Question: {a} {b} {c}? Answer: {c} {a}.")
        elif i % 7 == 1:
            sentences.append(f"USER: {a} {b} ASSISTANT: {c} [[012,345,678,901]]")
        else:
            sentences.append(f"{a} {b} {c}, {c} {b}!")
    return sentences


def make_tiny_llama_tokenizer(path) -> "LlamaTokenizer":  # noqa: F821
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    prefix = f"{path}/spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=prefix, vocab_size=VOCAB_SIZE, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    merges = generate_merges(vocab, scores, skip_tokens={"<unk>", "<s>", "</s>"})
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges)
    tokenizer.save_pretrained(path)
    return tokenizer


# --- Llama tokenizer folders in the shapes users have ---------------------------------------------------------

TOKENIZER_SHAPES = ("slow", "json", "both")
SHAPE_TEXT = "Question: what is this? Answer: a red box. ünï"  # byte fallback at the end


def _added(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


# lmsys/vicuna-7b-v1.5's tokenizer_config.json, as FastChat (transformers 4.3x) saved it next to tokenizer.model
VICUNA_TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": _added("<s>"), "clean_up_tokenization_spaces": False,
    "eos_token": _added("</s>"), "legacy": False, "model_max_length": 4096, "pad_token": None,
    "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": _added("<unk>"),
}


def write_tokenizer_shape(spm_model, folder, shape: str):
    """A Llama tokenizer folder made from ``spm_model``, in one of the shapes users have:

    - ``slow``: ``tokenizer.model`` + ``tokenizer_config.json`` only (FastChat-made Vicuna folders, lmsys deltas);
    - ``json``: ``tokenizer.json`` + ``tokenizer_config.json`` (what transformers 5's ``save_pretrained`` writes);
    - ``both``: the three (hub Llama repos).

    The ``tokenizer.json`` is what transformers makes of the slow files (its SentencePiece extractor: protobuf).
    """
    import json
    import shutil
    from pathlib import Path

    from transformers import LlamaTokenizer

    if shape not in TOKENIZER_SHAPES:
        raise ValueError(f"shape {shape!r} is not one of {TOKENIZER_SHAPES}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(spm_model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(VICUNA_TOKENIZER_CONFIG, indent=2))
    if shape != "slow":
        LlamaTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    if shape == "json":
        (folder / "tokenizer.model").unlink()
    return folder


def sentencepiece_ids(spm_model, text: str = SHAPE_TEXT) -> list[int]:
    """SentencePiece's own ids of ``text`` after LLaMA's BOS: what a tokenizer of any shape must produce."""
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    return [sp.bos_id(), *sp.encode(text)]
