"""What a hub folder of each model family contains: classes, code entry points, chat defaults, card facts.

A family names its classes by module (inside ``src/modeling_visualglm``) and class name; the writer imports
them only to build configs, tokenizers and processors, and copies the import closure of the listed modules.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

PACKAGE = "modeling_visualglm"

# generation_config.json is neutral: a plain generate() or pipeline() decodes greedily and stops at EOS or after this
# many new tokens, without warnings. The originals' chat defaults are written once per family in the model code
# (CHAT_DEFAULTS of its configuration module, read through the model class's `chat_defaults_for(config)`): chat,
# stream_chat, the CLIs and the model card (card.py) all read them there, never a copy here.
NEUTRAL_GENERATION = dict(max_new_tokens=256)


def package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{PACKAGE} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class ClassRef:
    module: str  # module name inside the package, e.g. "modeling_visualglm"
    name: str

    def load(self):
        return getattr(importlib.import_module(f"{PACKAGE}.{self.module}"), self.name)

    @property
    def auto_map_value(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class Family:
    name: str
    model: ClassRef
    config: ClassRef
    tokenizer: ClassRef
    processor: ClassRef | None
    image_processor: ClassRef | None
    base_model: str
    license: str
    license_name: str | None = None
    license_link: str | None = None
    tags: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    title: str = ""
    summary: str = ""
    example_query: str = "Describe the image."
    extra_card: str = ""
    # constructor keyword arguments that depend on the model config
    image_processor_kwargs: Callable[[object], dict] = lambda config: {}
    processor_kwargs: Callable[[object], dict] = lambda config: {}
    model_auto_classes: tuple[str, ...] = field(
        default=("AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"))
    # the model without its LM head, when the family has one: auto_map's AutoModel names it (as transformers' own
    # multimodal models do), which is what vLLM's Transformers backend loads before adding its own head
    base_class: ClassRef | None = None
    # what --tokenizer should point at, for the "incomplete folder" messages
    tokenizer_hint: str = "ChatGLM-6B's ice_text.model or a folder holding it"

    def code_modules(self) -> list[str]:
        refs = [self.model, self.config, self.tokenizer, self.processor, self.image_processor]
        return [r.module for r in refs if r is not None]

    def config_auto_map(self) -> dict:
        auto = {"AutoConfig": self.config.auto_map_value}
        for key in self.model_auto_classes:
            auto[key] = self.model.auto_map_value
        if self.base_class is not None and "AutoModel" in auto:
            auto["AutoModel"] = self.base_class.auto_map_value
        if self.processor is not None:
            auto["AutoProcessor"] = self.processor.auto_map_value
        if self.image_processor is not None:
            auto["AutoImageProcessor"] = self.image_processor.auto_map_value
        return auto


VISUALGLM = Family(
    name="visualglm",
    model=ClassRef("modeling_visualglm", "VisualGLMForConditionalGeneration"),
    config=ClassRef("configuration_visualglm", "VisualGLMConfig"),
    tokenizer=ClassRef("tokenization_chatglm", "ChatGLMTokenizer"),
    processor=ClassRef("processing_visualglm", "VisualGLMProcessor"),
    image_processor=ClassRef("image_processing_visualglm", "VisualGLMImageProcessor"),
    base_model="THUDM/visualglm-6b",
    license="other",
    license_name="visualglm-6b-model-license",
    license_link="https://github.com/THUDM/VisualGLM-6B/blob/main/MODEL_LICENSE.txt",
    tags=("visualglm", "chatglm", "blip-2", "multimodal"),
    languages=("zh", "en"),
    title="VisualGLM-6B",
    summary=(
        "VisualGLM-6B (THUDM): an EVA-CLIP ViT-g image encoder and a BLIP-2 Q-Former feeding 32 image tokens "
        "into ChatGLM-6B. This folder is a transformers 5.x `trust_remote_code` re-implementation with the "
        "original weights converted to safetensors."
    ),
    example_query="描述这张图片。",
    image_processor_kwargs=lambda config: {"size": config.vision_config.image_size},
    processor_kwargs=lambda config: {"num_image_tokens": config.num_image_tokens},
)

MINIGPT4 = Family(
    name="minigpt4",
    model=ClassRef("modeling_minigpt4", "MiniGPT4ForConditionalGeneration"),
    base_class=ClassRef("modeling_minigpt4", "MiniGPT4Model"),
    config=ClassRef("configuration_minigpt4", "MiniGPT4Config"),
    tokenizer=ClassRef("processing_minigpt4", "MiniGPT4Tokenizer"),
    processor=ClassRef("processing_minigpt4", "MiniGPT4Processor"),
    image_processor=ClassRef("image_processing_visualglm", "VisualGLMImageProcessor"),
    tokenizer_hint="the Vicuna / Llama-2 `tokenizer.model`, i.e. the --llm folder's tokenizer",
    base_model="Vision-CAIR/MiniGPT-4",
    license="bsd-3-clause",
    tags=("minigpt4", "llama", "vicuna", "blip-2", "multimodal"),
    languages=("en",),
    title="MiniGPT-4",
    summary=(
        "MiniGPT-4 (Vision-CAIR): an EVA-CLIP ViT-g image encoder, a BLIP-2 Q-Former (Vicuna-v0) or merged "
        "patch tokens (LLaMA-2, MiniGPT-v2) and one linear projection into a LLaMA language model. This folder is "
        "a transformers 5.x `trust_remote_code` re-implementation with the original weights converted to safetensors."
    ),
    image_processor_kwargs=lambda config: {"size": config.vision_config.image_size},
    processor_kwargs=lambda config: {"num_image_tokens": config.num_image_tokens, "variant": config.variant},
)

COGVLM = Family(
    name="cogvlm",
    model=ClassRef("modeling_cogvlm", "CogVLMForConditionalGeneration"),
    config=ClassRef("configuration_cogvlm", "CogVLMConfig"),
    # CogVLM uses stock transformers tokenizers (Vicuna's Llama / Llama-3's): no remote tokenizer code
    tokenizer=None,
    processor=ClassRef("processing_cogvlm", "CogVLMProcessor"),
    image_processor=ClassRef("image_processing_cogvlm", "CogVLMImageProcessor"),
    base_model="THUDM/cogvlm-chat-hf",
    license="other",
    license_name="cogvlm-model-license",
    license_link="https://github.com/THUDM/CogVLM/blob/main/MODEL_LICENSE",
    tags=("cogvlm", "llama", "eva-clip", "multimodal"),
    languages=("en",),
    title="CogVLM",
    summary=(
        "CogVLM / CogVLM2 (THUDM): an EVA2-CLIP-E image encoder, a GLU adapter (CogVLM2: after a 2x2 conv "
        "downsample) and a LLaMA language model with per-token visual-expert attention and MLP weights. This "
        "folder is a transformers 5.x `trust_remote_code` re-implementation with the original weights converted "
        "to safetensors."
    ),
    image_processor_kwargs=lambda config: {"size": config.vision_config.image_size},
    processor_kwargs=lambda config: {"num_image_tokens": config.num_image_tokens,
                                     "image_token_id": config.image_token_id,
                                     "pad_token_id": config.text_config.pad_token_id,
                                     "template_version": config.template_version},
    tokenizer_hint="CogVLM1: a Vicuna-7B-v1.5 tokenizer folder; CogVLM2: its Llama-3 tokenizer folder",
)

FAMILIES = {f.name: f for f in (VISUALGLM, MINIGPT4, COGVLM)}
