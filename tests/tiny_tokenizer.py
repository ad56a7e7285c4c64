"""Tests import the tiny tokenizer builder from here; it lives in the package so the demo can use it."""

from modeling_visualglm.tiny_tokenizer import (  # noqa: F401
    make_tiny_chatglm_tokenizer,
    train_ice_text_like_model,
    write_ice_text_model,
)
