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
def tiny_hub_folders(tmp_path_factory) -> dict:
    """A tiny hub folder of every family (random weights), written once per session (tests/tiny_folders.py)."""
    from tiny_folders import FOLDERS, write_tiny_folder

    root = tmp_path_factory.mktemp("tiny_hub_folders")
    return {name: write_tiny_folder(name, root / name) for name in FOLDERS}


def shipped_trained_families() -> list[str]:
    """The families whose tiny *trained* model ships in tools/trained (docs/tiny_models.md)."""
    from pathlib import Path

    from modeling_visualglm.tools.tiny_models import TRAINED_FAMILIES, trained_dir

    return [f for f in TRAINED_FAMILIES if (Path(str(trained_dir(f))) / "model.safetensors").is_file()]


@pytest.fixture(scope="session")
def trained_hub_folders(tmp_path_factory) -> dict:
    """A hub folder of every shipped tiny trained model (fp16 weights, written by the project's writer)."""
    from modeling_visualglm.tools.tiny_models import load_trained
    from modeling_visualglm.tools.train_tiny import FAMILIES, write_hub

    root = tmp_path_factory.mktemp("trained_hub_folders")
    folders = {}
    for family in shipped_trained_families():
        model, tokenizer = load_trained(family)
        folders[family] = write_hub(FAMILIES[family], model, tokenizer, root / family)
    return folders


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


# The slow tier, in one place: what `scripts/test.sh --quick` leaves out. Each entry is a test file, or a file and
# the start of test names; they take seconds each because they start interpreters (fresh-interpreter loads, CLI
# round trips, the docs' blocks), install or build (reference tools, wheels), or run whole pipelines.
SLOW = {
    "test_docs.py": ("",),  # every docs block in its own interpreter
    "test_demo.py": ("",),
    "test_packaging.py": ("",),  # builds and installs a wheel
    "test_tiny_trained.py": ("",),
    "test_benchmarks.py": ("test_table_smoke_cpu", "test_compile_cache_smoke_cpu"),  # compiles in 2 processes
    "test_compat.py": ("test_hub_folders_work_on_the_installed_transformers",),
    "test_conversion_visualglm.py": ("test_coverage_report", "test_check_passes", "test_push_to_fake_hub",
                                     "test_fresh_interpreter", "test_usage_errors"),
    "test_conversion_cogvlm.py": ("test_check_passes", "test_fresh_interpreter", "test_folders_are_complete"),
    "test_conversion_minigpt4.py": ("test_converted_folder_logits", "test_unloadable_tokenizer_folder"),
    "test_conversion_llama.py": ("test_equals_transformers_4_45_converter",),
    "test_conversion_hostile.py": ("test_sigterm_and_sigkill",),
    "test_conversion_framework.py": ("test_only_one_shard_of_tensors", "test_malicious_pickle"),
    "test_tokenizer.py": ("test_auto_tokenizer_with_remote_code_in_a_clean_interpreter",),
    "test_processor.py": ("test_processor_save_and_auto_load_in_a_clean_interpreter",),
    "test_hub_export.py": ("test_push_and_check_cli", "test_check_on_a_device"),
    "test_device_map.py": ("test_offloaded_device_map",),
    "test_finetune_ddp.py": ("",),  # two gloo processes
    "test_chat_cli.py": ("",),  # a real pseudo-terminal per test
    "test_web.py": ("",),  # gradio in headless Chromium
    "test_serve.py": ("test_docs_session_block", "test_load_short"),
    "test_finetune.py": ("test_train_eval_merge_check", "test_resume_continues"),
    "test_finetune_learning.py": ("",),  # three LoRA runs of ~50 s on the tiny trained models
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        prefixes = SLOW.get(item.path.name, ())
        if any(item.name.startswith(p) for p in prefixes):
            item.add_marker(pytest.mark.slow)
