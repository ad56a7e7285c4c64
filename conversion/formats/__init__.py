"""Registry of source formats (``visualglm-convert --format NAME``). ``--format`` is always explicit."""

from .base import SOURCE_FLAGS, Format, Loaded
from .visualglm import HfVisualGLM, SatVisualGLM

FORMATS: dict[str, Format] = {f.name: f for f in (SatVisualGLM(), HfVisualGLM())}

__all__ = ["FORMATS", "SOURCE_FLAGS", "Format", "Loaded"]
