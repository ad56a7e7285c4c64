"""Tests import the tiny tokenizer builder from here; it lives in the package so the demo can use it."""

from modeling_visualglm.tools.tiny_tokenizer import *  # noqa: F401,F403
