"""ChatGLMTokenizer against the ice_text rules, checked with raw SentencePiece calls on a tiny ice_text-like model.

Expected ids are derived here from the rules of THUDM's tokenizer (greensheng/chatglm-6b ``main``
``tokenization_chatglm.py``): "\\n" → ``<n>``, "\\t" → ``<|tab|>``, runs of 2..80 spaces → ``<|blank_k|>``
(longest first, as the original's replace loop), then ``SentencePieceProcessor.encode`` with its dummy
prefix, then ``[gMASK], <sop>``. The tokenizer class is never used to produce an expected value.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sentencepiece as spm

from helpers import sp, tok  # noqa: F401 - pytest fixtures
from modeling_visualglm import tokenization_chatglm
from modeling_visualglm.tokenization_chatglm import ChatGLMTokenizer
from tiny_tokenizer import SPECIAL_PIECES, WHITESPACE_PIECES, make_tiny_chatglm_tokenizer


def original_preprocess(text: str) -> str:
    """The original SPTokenizer._preprocess, as a plain loop (reference, not the class under test)."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for k in range(80, 1, -1):
        text = text.replace(" " * k, f"<|blank_{k}|>")
    return text


TEXTS = [
    "hello world",
    "问：这张图片的背景里有什么内容？\n答：",
    "line one\nline two\n\nline four",
    "a\tb\t\tc",
    "x  y",  # 2 spaces
    "x   y",  # 3 spaces
    "x" + " " * 80 + "y",
    "x" + " " * 81 + "y",
    "x" + " " * 200 + "y",
    "def main():\n    print('hello')\t# greeting",
    "你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你。",
    "Q:What is in the picture?\nA:A red circle.",
    "\n leading newline and  mixed \t  whitespace\n",
]


def test_tiny_model_is_laid_out_like_ice_text(sp):
    n = sp.get_piece_size()
    assert [sp.id_to_piece(i) for i in range(5)] == ["<unk>", "<s>", "</s>", "<pad>", "<n>"]
    assert sp.id_to_piece(5) == "▁"
    first_special = n - len(SPECIAL_PIECES) - len(WHITESPACE_PIECES) - 256
    tail = [sp.id_to_piece(i) for i in range(first_special, n)]
    assert tail == SPECIAL_PIECES + WHITESPACE_PIECES + [f"<0x{b:02X}>" for b in range(256)]
    assert all(sp.is_control(sp.piece_to_id(p)) for p in SPECIAL_PIECES)
    assert all(sp.is_byte(i) for i in range(n - 256, n))
    # CONTROL specials are never produced from text and decode to nothing (chatglm.cpp's "你好" test)
    assert sp.piece_to_id("[gMASK]") not in sp.encode("a [gMASK] b")
    assert sp.decode([5, sp.piece_to_id("[gMASK]"), sp.piece_to_id("<sop>")]) == ""
    # USER_DEFINED whitespace pieces come out whole, mid-text without a "▁" of their own
    assert sp.encode("a<n>b<|blank_4|>c<|tab|>", out_type=str)[1:] == ["<n>", "b", "<|blank_4|>", "c", "<|tab|>"]


def test_special_ids_come_from_the_sentencepiece_model(tok, sp):
    assert tok.unk_token_id == sp.piece_to_id("<unk>") == 0
    assert tok.pad_token_id == sp.piece_to_id("<pad>") == 3
    assert tok.mask_token_id == sp.piece_to_id("[MASK]")
    assert tok.gmask_token_id == sp.piece_to_id("[gMASK]")
    assert tok.smask_token_id == sp.piece_to_id("[sMASK]")
    assert tok.sop_token_id == tok.bos_token_id == sp.piece_to_id("<sop>")
    assert tok.eop_token_id == tok.eos_token_id == sp.piece_to_id("<eop>")
    assert tok.vocab_size == sp.get_piece_size()
    assert tok.image_token_id == sp.get_piece_size()  # first id after the pieces
    assert len(tok) == sp.get_piece_size() + 1
    assert tok.padding_side == "left"
    assert tok.convert_ids_to_tokens(tok.image_token_id) == "<image>"


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_the_ice_text_rules(tok, sp, text):
    expected = sp.encode(original_preprocess(text))
    assert tok.encode(text, add_special_tokens=False) == expected
    assert tok(text)["input_ids"] == expected + [sp.piece_to_id("[gMASK]"), sp.piece_to_id("<sop>")]
    assert max(expected) < sp.get_piece_size()  # SentencePiece never yields the <image> id


def test_space_runs_are_cut_longest_first(tok):
    def blanks(n):
        return [p for p in tok.tokenize("x" + " " * n + "y") if p.startswith("<|")]

    assert blanks(2) == ["<|blank_2|>"]
    assert blanks(3) == ["<|blank_3|>"]
    assert blanks(80) == ["<|blank_80|>"]
    assert blanks(82) == ["<|blank_80|>", "<|blank_2|>"]
    assert blanks(200) == ["<|blank_80|>", "<|blank_80|>", "<|blank_40|>"]
    # 81 = 80 + one space, and a single space stays SentencePiece's "▁" (here glued to "y")
    pieces = tok.tokenize("x" + " " * 81 + "y")
    assert blanks(81) == ["<|blank_80|>"]
    assert pieces[pieces.index("<|blank_80|>") + 1].startswith("▁")


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # [gMASK] and <sop> are CONTROL pieces: they decode to nothing
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_decode_drops_pad_and_handles_batches(tok):
    a, b = tok("你好")["input_ids"], tok("what\n  is")["input_ids"]
    assert tok.decode([tok.pad_token_id] * 3 + a) == "你好"
    assert tok.decode([a, b]) == ["你好", "what\n  is"]


def test_added_specials_split_text_and_each_piece_gets_its_own_prefix(tok, sp):
    img = tok.image_token_id
    ids = tok.encode("ab<image><image>cd [gMASK]ef", add_special_tokens=False)
    assert ids == sp.encode("ab") + [img, img] + sp.encode("cd ") + [sp.piece_to_id("[gMASK]")] + sp.encode("ef")
    assert tok.decode(ids) == "ab<image><image>cd ef"  # text after an added token decodes on its own
    assert tok.decode(ids, skip_special_tokens=True) == "abcd ef"


def test_unknown_id_raises_a_clear_error(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, len(tok) + 7])


def test_pickle_round_trip(tok):
    import pickle

    again = pickle.loads(pickle.dumps(tok))
    assert again(TEXTS[9])["input_ids"] == tok(TEXTS[9])["input_ids"]


def test_special_tokens_for_prompt_and_pair(tok, sp):
    g, sop, eop = sp.piece_to_id("[gMASK]"), sp.piece_to_id("<sop>"), sp.piece_to_id("<eop>")
    a, b = sp.encode("问：你好<n>答："), sp.encode("你好")
    assert tok.build_inputs_with_special_tokens(a) == a + [g, sop]
    assert tok.build_inputs_with_special_tokens(a, b) == a + [g, sop] + b + [eop]
    enc = tok("问：你好\n答：", "你好", return_special_tokens_mask=True)
    assert enc["input_ids"] == a + [g, sop] + b + [eop]
    assert enc["special_tokens_mask"] == [0] * len(a) + [1, 1] + [0] * len(b) + [1]


def test_left_padding(tok, sp):
    texts = ["hi", "问：这张图片的背景里有什么内容？\n答："]
    rows = [sp.encode(original_preprocess(t)) + [tok.gmask_token_id, tok.sop_token_id] for t in texts]
    batch = tok(texts, padding=True, return_tensors="pt")
    width = max(len(r) for r in rows)
    assert batch["input_ids"].shape == (2, width)
    for row, ids, mask in zip(rows, batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        pad = width - len(row)
        assert ids == [sp.piece_to_id("<pad>")] * pad + row
        assert mask == [0] * pad + [1] * len(row)


def test_save_and_reload(tok, tmp_path, tiny_tokenizer_dir):
    tok.save_pretrained(tmp_path)
    original = (Path(tiny_tokenizer_dir) / "ice_text.model").read_bytes()
    assert (tmp_path / "ice_text.model").read_bytes() == original
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
    assert config["padding_side"] == "left"
    # the code file travels with the folder (copied by save_pretrained, as the hub export does)
    with open(tokenization_chatglm.__file__, "rb") as f:
        assert (tmp_path / "tokenization_chatglm.py").read_bytes() == f.read()
    again = ChatGLMTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.image_token_id == tok.image_token_id


def test_model_without_glm_specials_is_rejected(tmp_path):
    import io

    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a plain corpus without any glm pieces"] * 20),
        model_writer=writer,
        vocab_size=40,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (tmp_path / "ice_text.model").write_bytes(writer.getvalue())
    with pytest.raises(ValueError, match="is not a piece"):
        ChatGLMTokenizer(vocab_file=str(tmp_path / "ice_text.model"))


BLOCKER = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_visualglm", "conversion", "hub_export"):
                raise ImportError("blocked in this test: " + name)
    sys.meta_path.insert(0, _Block())
    """
)


def run_isolated(code: str, tmp_path) -> dict:
    """Run ``code`` in ``python -I`` where our packages cannot be imported; it prints one JSON line."""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", BLOCKER + textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_auto_tokenizer_with_remote_code_in_a_clean_interpreter(tok, tmp_path):
    folder = tmp_path / "hub"
    make_tiny_chatglm_tokenizer(folder)
    out = run_isolated(
        f"""
        from transformers import AutoTokenizer
        try:
            import modeling_visualglm
            blocked = False
        except ImportError:
            blocked = True
        t = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
        texts = {TEXTS!r}
        batch = t(texts[:2], padding=True)
        print(json.dumps({{
            "blocked": blocked,
            "module": type(t).__module__,
            "ids": [t(x)["input_ids"] for x in texts],
            "decoded": [t.decode(t(x)["input_ids"]) for x in texts],
            "batch": batch["input_ids"],
            "image_token_id": t.image_token_id,
        }}, ensure_ascii=False))
        """,
        tmp_path,
    )
    assert out["blocked"]
    assert out["module"].startswith("transformers_modules.")
    assert out["ids"] == [tok(x)["input_ids"] for x in TEXTS]
    assert out["decoded"] == [tok.decode(tok(x)["input_ids"]) for x in TEXTS]
    assert out["batch"] == tok(TEXTS[:2], padding=True)["input_ids"]
    assert out["image_token_id"] == tok.image_token_id
