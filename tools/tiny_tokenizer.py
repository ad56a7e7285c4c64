"""A tiny SentencePiece model laid out like ChatGLM-6B's ``ice_text.model``, for tests.

The real ``ice_text.model`` (130,344 pieces) is a SentencePiece model whose piece list is:

    ids 0-3      ``<unk>``, ``<s>``, ``</s>``, ``<pad>`` (pad id 3 = config ``pad_token_id``; the other three
                 are SentencePiece's defaults, inferred: ``</s>`` is the original's ``end_token``)
    id 4         ``<n>`` (USER_DEFINED: the newline stand-in, always one piece)
    ...          the trained pieces (id 5 = ``▁``; trainer type, unigram or BPE, not known: the tiny one is unigram)
    N .. N+7     ``[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>`` (CONTROL)
    N+8          ``<|tab|>`` (USER_DEFINED)
    N+9 .. N+87  ``<|blank_2|>`` .. ``<|blank_80|>`` (USER_DEFINED)
    last 256     ``<0x00>`` .. ``<0xFF>`` (BYTE, with ``trainer_spec.byte_fallback`` on)

with N = 130000 in the real model. How that is known:
- icetk's ``SPTokenizer._configure_tokenizer`` (greensheng/chatglm-6b, commit 2dd4709, ``tokenization_chatglm.py``,
  the pre-"slim" version) appends exactly these pieces to the trained text model: the eight specials, then
  ``<|tab|>`` and ``<|blank_2..80|>`` as type 4 (USER_DEFINED), then 256 byte pieces as type 6 (BYTE).
  130000 + 8 + 1 + 79 + 256 = 130344, the piece count of the slim model (ChatGLM-6B issue #987), and the ids
  agree: ``[gMASK]`` 130001, ``<sop>`` 130004, ``<|tab|>`` 130008, ``<|blank_4|>`` 130011 and ``<0xF0>`` 130328
  in chatglm.cpp's tokenizer test for ChatGLM-6B ("def main():\\n    print(...)\\t# ..." and "你好👋！...").
- icetk wrote the specials as CONTROL (type 3) in its default tokenizer and as USER_DEFINED (type 4) only in
  a second, ``encode_special_tokens=True`` copy. The slim model keeps the CONTROL variant: chatglm.cpp's test
  decodes ``[5, 74874, 130001, 130004]`` with plain ``SentencePieceProcessor.Decode`` to exactly "你好", which
  only happens when ``[gMASK]``/``<sop>`` are CONTROL pieces (a USER_DEFINED piece decodes to its own text).
  Consequence: SentencePiece never produces them from text ("[gMASK]" in raw text is split into ``▁[``,
  ``g``, ...); only the tokenizer class maps them (as added special tokens).
- ``<n>`` is USER_DEFINED: "\\n" encodes to id 4 in the middle of text (chatglm.cpp test), and the original
  ``add_dummy_prefix=False`` trick (encode ``"<n>" + text`` and drop two ids) relies on ``"<n>"`` being one
  piece after the ``▁`` dummy prefix.
- Normalization is the identity: the same test decodes "问：" and "，" (full-width) back unchanged, which NFKC
  would have turned into ":" and ",". Whether ``remove_extra_whitespaces`` is on in the real model was not
  verified; the tiny model keeps SentencePiece's default (on), which only matters for a single leading or
  trailing space.

The tiny model is trained in a fraction of a second from a generated English + Chinese corpus (deterministic),
then the ice_text pieces are appended to the serialized ``ModelProto`` exactly as icetk did (protobuf merges
repeated fields appended at the end of the message, so no protobuf library is needed).
"""

from __future__ import annotations

import io
import itertools
import os
import struct

import sentencepiece as spm

VOCAB_FILE = "ice_text.model"
# the trained part (meta pieces, <n>, learned pieces); 8 specials + 80 whitespace + 256 bytes are added on top
TRAINED_VOCAB_SIZE = 150

SPECIAL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
WHITESPACE_PIECES = ["<|tab|>"] + [f"<|blank_{k}|>" for k in range(2, 81)]

# sentencepiece_model.proto: ModelProto.pieces = 1, ModelProto.trainer_spec = 2,
# SentencePiece.piece = 1 / score = 2 / type = 3, TrainerSpec.byte_fallback = 35
_TYPE_CONTROL, _TYPE_USER_DEFINED, _TYPE_BYTE = 3, 4, 6

_MODEL_BYTES: bytes | None = None  # trained once per interpreter (test session)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _piece_record(piece: str, piece_type: int) -> bytes:
    body = _length_delimited(1, piece.encode("utf-8"))
    body += _varint(2 << 3 | 5) + struct.pack("<f", 0.0)
    body += _varint(3 << 3 | 0) + _varint(piece_type)
    return _length_delimited(1, body)


def _corpus() -> list[str]:
    """Deterministic lines in the preprocessed form the real model was trained on ("\\n" already ``<n>``)."""
    english = [
        "What is in this picture?",
        "Describe the image in detail.",
        "The photo shows a red circle and a blue square on a white background.",
        "There is a green triangle next to a yellow line.",
        "A small cat is sitting on the table near the window.",
        "Please answer the question about the image.",
        "The sky is blue and the grass is green.",
        "def main(): print('hello world')",
        "Q:What color is the circle?<n>A:The circle is red.",
        "Q:How many shapes are there?<n>A:There are three shapes.",
    ]
    chinese = [
        "这张图片的背景里有什么内容？",
        "问：描述这张图片。<n>答：图片中有一个红色的圆和一个蓝色的正方形。",
        "问：图片里有几个形状？<n>答：图片里有三个形状。",
        "问：这是什么颜色？<n>答：这是绿色的三角形。",
        "你好，我是人工智能助手。",
        "请详细描述这张图片的内容。",
        "天空是蓝色的，草地是绿色的。",
        "一只小猫坐在窗边的桌子上。",
        "<img></img>问：图中有什么？<n>答：有一个圆形。",
    ]
    lines = []
    for i, (en, zh) in enumerate(itertools.product(english, chinese)):
        lines.append(f"{en} {zh}" if i % 2 else f"{zh}{en}")
    return lines + english * 5 + chinese * 5


def train_ice_text_like_model() -> bytes:
    """The serialized tiny model (trained once per process, then reused)."""
    global _MODEL_BYTES
    if _MODEL_BYTES is not None:
        return _MODEL_BYTES
    _MODEL_BYTES = train_ice_text_like_model_on(_corpus(), TRAINED_VOCAB_SIZE)
    return _MODEL_BYTES


def write_ice_text_model(path: str | os.PathLike) -> str:
    """Write the tiny model as ``path/ice_text.model`` and return the file path."""
    os.makedirs(path, exist_ok=True)
    model_file = os.path.join(os.fspath(path), VOCAB_FILE)
    with open(model_file, "wb") as f:
        f.write(train_ice_text_like_model())
    return model_file


def make_tiny_chatglm_tokenizer(path: str | os.PathLike):
    """Train (once per session) the tiny ice_text-like model, save a complete tokenizer folder at ``path``
    (``ice_text.model`` + ``tokenizer_config.json`` with the AutoTokenizer ``auto_map`` + the code file) and
    return the loaded ``ChatGLMTokenizer``."""
    from modeling_visualglm.tokenization_chatglm import ChatGLMTokenizer

    model_file = write_ice_text_model(path)
    tokenizer = ChatGLMTokenizer(vocab_file=model_file)
    tokenizer.save_pretrained(path)
    return tokenizer


# --- tokenizers of the tiny *trained* models (tools/train_tiny.py) ---------------------------------------------

def train_ice_text_like_model_on(lines: list[str], trained_vocab_size: int = 200) -> bytes:
    """An ice_text-like SentencePiece model (ChatGLM's pieces appended as icetk did, see the module header) trained on
    ``lines`` (in the preprocessed form: ``<n>`` for newlines). ``character_coverage`` 1.0: every character of
    ``lines`` becomes a piece, so the corpus must hold every character the model should read or write."""
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=writer,
        model_type="unigram",
        vocab_size=trained_vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        pad_piece="<pad>",
        user_defined_symbols=["<n>"],
        num_threads=1,
        minloglevel=2,
    )
    appended = b"".join(_piece_record(p, _TYPE_CONTROL) for p in SPECIAL_PIECES)
    appended += b"".join(_piece_record(p, _TYPE_USER_DEFINED) for p in WHITESPACE_PIECES)
    appended += b"".join(_piece_record(f"<0x{b:02X}>", _TYPE_BYTE) for b in range(256))
    # a second trainer_spec record is merged into the first one by the protobuf parser
    appended += _length_delimited(2, _varint(35 << 3 | 0) + _varint(1))
    return writer.getvalue() + appended


def make_chatglm_tokenizer_from_corpus(path: str | os.PathLike, lines: list[str], trained_vocab_size: int = 200):
    """An ice_text-like ``ice_text.model`` trained on ``lines``, saved as a tokenizer folder at ``path``; returns the
    loaded ``ChatGLMTokenizer``."""
    from modeling_visualglm.tokenization_chatglm import ChatGLMTokenizer

    os.makedirs(path, exist_ok=True)
    model_file = os.path.join(os.fspath(path), VOCAB_FILE)
    with open(model_file, "wb") as f:
        f.write(train_ice_text_like_model_on(lines, trained_vocab_size))
    tokenizer = ChatGLMTokenizer(vocab_file=model_file)
    tokenizer.save_pretrained(path)
    return tokenizer


def train_llama_like_model(path: str | os.PathLike, lines: list[str], vocab_size: int = 400) -> str:
    """A LLaMA-format SentencePiece model (BPE, byte fallback, ids 0-2 = ``<unk> <s> </s>``, no pad, identity
    normalization, dummy prefix) trained on ``lines``, written as ``path/tokenizer.model``; returns the file path."""
    os.makedirs(path, exist_ok=True)
    prefix = os.path.join(os.fspath(path), "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True, num_threads=1)
    os.remove(prefix + ".vocab")
    return prefix + ".model"


def llama_tokenizer_from_model(model_file: str | os.PathLike, tokenizer_class=None, **kwargs):
    """transformers' tokenizers-backed ``LlamaTokenizer`` (or ``tokenizer_class``) for a LLaMA-format SentencePiece
    model, built without protobuf: pieces and scores through ``SentencePieceProcessor``, merges rebuilt with
    transformers' ``generate_merges``."""
    from transformers.convert_slow_tokenizer import generate_merges

    if tokenizer_class is None:
        from transformers import LlamaTokenizer as tokenizer_class
    sp = spm.SentencePieceProcessor(model_file=os.fspath(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    merges = generate_merges(vocab, scores, skip_tokens={"<unk>", "<s>", "</s>"})
    return tokenizer_class(vocab=vocab, merges=merges, **kwargs)
