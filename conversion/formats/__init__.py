"""Registry of source formats (``visualglm-convert --format NAME``). ``--format`` is always explicit."""

from .base import SOURCE_FLAGS, Format, Loaded
from .cogvlm import HfCogVLM, SatCogVLM
from .fastchat import FastChatDelta
from .llama import LlamaOriginal
from .minigpt4 import MiniGPT4Format
from .visualglm import HfVisualGLM, SatVisualGLM

FORMATS: dict[str, Format] = {f.name: f for f in (SatVisualGLM(), HfVisualGLM(), LlamaOriginal(), FastChatDelta(), MiniGPT4Format(),
                              SatCogVLM(), HfCogVLM())}

__all__ = ["FORMATS", "SOURCE_FLAGS", "Format", "Loaded"]
