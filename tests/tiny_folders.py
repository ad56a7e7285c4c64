"""Tiny seeded hub folders of every family, written by the project's own folder writer (test helper).

``write_tiny_folder(name, out)`` builds a random tiny model (CONTRACTS §6) of ``name`` in ``FOLDERS`` with a tiny
trained SentencePiece tokenizer of the family's format and writes a complete hub folder with
``hub_export.writer.write_hub_folder``. Used by tests/test_compat.py and by the compatibility stage of .ci/run
(``python tests/tiny_folders.py OUT``), which loads the folders under other transformers releases.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

FOLDERS = ("visualglm", "cogvlm", "cogvlm2", "minigpt4")


def _visualglm(scratch: Path):
    from tiny_tokenizer import make_tiny_chatglm_tokenizer

    from modeling_visualglm.modeling_visualglm import VisualGLMForConditionalGeneration
    from modeling_visualglm.tools.tiny_models import tiny_visualglm_config
    from modeling_visualglm.tokenization_chatglm import ChatGLMTokenizer

    make_tiny_chatglm_tokenizer(scratch)
    tokenizer = ChatGLMTokenizer.from_pretrained(str(scratch))
    model = VisualGLMForConditionalGeneration(tiny_visualglm_config(tokenizer))
    return model, tokenizer, 1


def _cogvlm(scratch: Path, version: str):
    from tiny_llama_tokenizer import make_tiny_llama_tokenizer

    from modeling_visualglm.configuration_cogvlm import CogVLMConfig
    from modeling_visualglm.modeling_cogvlm import CogVLMForConditionalGeneration

    tokenizer = make_tiny_llama_tokenizer(scratch)
    v2 = version == "cogvlm2"
    config = CogVLMConfig(
        version=version,
        vision_config=dict(image_size=112 if v2 else 56, patch_size=14, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, layernorm_order="post_sublayer",
                           use_post_layernorm=False, drop_cls_token=True),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2 if v2 else 8, vision_qkv_bias=v2,
                         rope_theta=500000.0 if v2 else 10000.0, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0),
    )
    return CogVLMForConditionalGeneration(config), tokenizer, 2 if v2 else 3


def _minigpt4(scratch: Path):
    import sentencepiece as spm
    from tiny_llama_tokenizer import _corpus
    from transformers.convert_slow_tokenizer import generate_merges

    from modeling_visualglm.configuration_minigpt4 import MiniGPT4Config
    from modeling_visualglm.modeling_minigpt4 import MiniGPT4ForConditionalGeneration
    from modeling_visualglm.processing_minigpt4 import MiniGPT4Tokenizer

    vocab_size = 400
    prefix = str(scratch / "spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus() + ["###Human: hi###Assistant: a red box " * 3]), model_prefix=prefix,
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    merges = generate_merges(vocab, scores, skip_tokens={"<unk>", "<s>", "</s>"})
    tokenizer = MiniGPT4Tokenizer(vocab=vocab, merges=merges, image_token_id=vocab_size)
    config = MiniGPT4Config(
        variant="vicuna0",
        vision_config=dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            num_query_tokens=8),
        text_config=dict(vocab_size=vocab_size + 1, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=512, use_visual_experts=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_id=vocab_size,
    )
    return MiniGPT4ForConditionalGeneration(config), tokenizer, 4


def write_tiny_folder(name: str, out: Path) -> Path:
    """A complete float32 hub folder of family ``name`` (see ``FOLDERS``) at ``out``."""
    from modeling_visualglm.hub_export.families import FAMILIES
    from modeling_visualglm.hub_export.writer import write_hub_folder
    from modeling_visualglm.tools.tiny_models import randomize_

    out = Path(out)
    with tempfile.TemporaryDirectory() as scratch:
        if name == "visualglm":
            model, tokenizer, seed = _visualglm(Path(scratch))
        elif name in ("cogvlm", "cogvlm2"):
            model, tokenizer, seed = _cogvlm(Path(scratch), name)
        elif name == "minigpt4":
            model, tokenizer, seed = _minigpt4(Path(scratch))
        else:
            raise ValueError(f"unknown tiny folder {name!r}; known: {FOLDERS}")
        randomize_(model.eval(), seed=seed)
        with torch.no_grad():  # larger output logits: fewer near-ties in greedy decoding (CONTRACTS §6)
            model.lm_head.weight.mul_(3.0)
        tied = set(model._tied_weights_keys or {}) if model.config.tie_word_embeddings else set()
        state = {k: v for k, v in model.state_dict().items() if k not in tied}
        entries = [((k,), v.nbytes, lambda k=k, v=v: {k: v}) for k, v in state.items()]
        family = FAMILIES["cogvlm" if name.startswith("cogvlm") else name]
        write_hub_folder(out, family=family, config=model.config, weight_entries=entries, dtype=torch.float32,
                         tokenizer=tokenizer, progress=False)
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1])
    for folder_name in sys.argv[2:] or FOLDERS:
        print(write_tiny_folder(folder_name, root / folder_name))
