import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers (sat_reference, tiny_tokenizer, fake_hub)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from tiny_tokenizer import make_tiny_chatglm_tokenizer

    path = tmp_path_factory.mktemp("tiny_chatglm_tokenizer")
    make_tiny_chatglm_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from modeling_visualglm.tokenization_chatglm import ChatGLMTokenizer

    return ChatGLMTokenizer.from_pretrained(str(tiny_tokenizer_dir))

