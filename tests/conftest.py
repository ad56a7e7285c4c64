import logging
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



class _DeprecationRecorder(logging.Handler):
    """Collects what transformers *logs* about deprecations (``logger.warning_once``, not ``warnings.warn``)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        # `torch_dtype` in a config.json the test wrote in a real checkpoint's layout (FastChat's Vicuna, THUDM's
        # folders): the user's file, not a call of ours
        if "deprecat" in message.lower() and "torch_dtype" not in message:
            self.messages.append(message)


@pytest.fixture(autouse=True)
def no_logged_deprecations():
    """transformers announces renames (5.24: ``past_key_values`` → ``cache``) through its logger as often as
    through FutureWarning: a test that makes transformers log a deprecation fails, like one that warns
    (pyproject's filterwarnings turn those into errors)."""
    recorder = _DeprecationRecorder()
    logger = logging.getLogger("transformers")
    logger.addHandler(recorder)
    try:
        yield
    finally:
        logger.removeHandler(recorder)
    if recorder.messages:
        pytest.fail("transformers logged a deprecation:\n" + "\n".join(recorder.messages))
