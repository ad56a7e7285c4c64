"""The models the benchmarks build: each family's real-size config, its tiny preset, its label in the tables and
how its prompt is laid out around the image placeholders. No torch import here (the report reads it too).

Real sizes are the checkpoints' (the configs' defaults for VisualGLM-6B and CogVLM/CogVLM2; Vicuna-v0 7B/13B
for MiniGPT-4). The peer is transformers' own ``LlamaForCausalLM`` at Vicuna-7B size: the same decode loop
without our code, the yardstick for everything ours does on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Family:
    label: str  # the model column of the docs tables
    kind: str  # "visualglm", "cogvlm", "minigpt4" or "peer"
    config: Callable  # config(tiny: bool) → the model's config
    image_path: str = ""  # the modules before the language model, as the split table names them
    text_extra: int = 0  # text ids added to every prompt (the peer's stand in for VisualGLM's 32 image slots)

    def model_class(self):
        if self.kind == "visualglm":
            from modeling_visualglm.modeling_visualglm import VisualGLMForConditionalGeneration as cls
        elif self.kind == "cogvlm":
            from modeling_visualglm.modeling_cogvlm import CogVLMForConditionalGeneration as cls
        elif self.kind == "minigpt4":
            from modeling_visualglm.modeling_minigpt4 import MiniGPT4ForConditionalGeneration as cls
        else:
            from transformers import LlamaForCausalLM as cls
        return cls

    def text_config(self, cfg):
        return cfg if self.kind == "peer" else cfg.text_config

    def pad_token_id(self, cfg) -> int:
        return 0 if self.kind == "peer" else cfg.text_config.pad_token_id

    def layout(self, cfg, body: list[int], image: list[int]) -> list[int]:
        """A prompt's ids: random text ``body`` around the ``image`` placeholders, as each family's prompt format."""
        if self.kind == "visualglm":  # "<img>" + image + "</img>Question: ..." ends with [gMASK] <sop>
            t = cfg.text_config
            return body[:2] + image + body[2:] + [t.gmask_token_id, t.bos_token_id]
        if self.kind == "cogvlm":  # <s> image text
            return [cfg.text_config.bos_token_id] + image + body
        if self.kind == "minigpt4":  # <s>###Human: <Img> image </Img> text
            return [cfg.text_config.bos_token_id] + body[:4] + image + body[4:]
        return [1] + body  # the peer: ``text_extra`` more text ids instead of an image


def _visualglm(tiny):
    from modeling_visualglm.configuration_visualglm import VisualGLMConfig
    from modeling_visualglm.tools.tiny_models import tiny_visualglm_config

    return tiny_visualglm_config(None) if tiny else VisualGLMConfig(image_token_id=130344)


def _cogvlm(version):
    def config(tiny):
        from modeling_visualglm.configuration_cogvlm import CogVLMConfig
        from modeling_visualglm.tools.tiny_models import tiny_cogvlm_config

        return tiny_cogvlm_config(version) if tiny else CogVLMConfig(version=version)

    return config


def _minigpt4(size):
    def config(tiny):
        from modeling_visualglm.configuration_minigpt4 import MiniGPT4Config
        from modeling_visualglm.tools.tiny_models import tiny_minigpt4_config

        if tiny:
            return tiny_minigpt4_config()
        # Vicuna v0: 32000 LLaMA ids + FastChat's [PAD] row, which the converter's placeholder reuses
        hidden, inter, layers, heads = {"7b": (4096, 11008, 32, 32), "13b": (5120, 13824, 40, 40)}[size]
        text = dict(vocab_size=32001, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=heads, use_visual_experts=False,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return MiniGPT4Config(variant="vicuna0", text_config=text, image_token_id=32000)

    return config


def _peer(tiny):
    from transformers import LlamaConfig

    size = (dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
            if tiny else dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32))
    return LlamaConfig(max_position_embeddings=4096, num_key_value_heads=size["num_attention_heads"], **size)


FAMILIES = {
    "visualglm": Family("VisualGLM-6B", "visualglm", _visualglm, "vision, Q-Former"),
    "cogvlm": Family("CogVLM-17B @490", "cogvlm", _cogvlm("cogvlm"), "vision, adapter"),
    "cogvlm2": Family("CogVLM2-19B @1344", "cogvlm", _cogvlm("cogvlm2"), "vision, adapter"),
    "minigpt4-7b": Family("MiniGPT-4 7B (Vicuna-v0)", "minigpt4", _minigpt4("7b"), "vision, Q-Former"),
    "minigpt4-13b": Family("MiniGPT-4 13B (Vicuna-v0)", "minigpt4", _minigpt4("13b"), "vision, Q-Former"),
    "peer": Family("transformers `LlamaForCausalLM` 7B (peer)", "peer", _peer, text_extra=32),
}


def parse_families(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    return names
