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
