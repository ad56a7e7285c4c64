"""Image processor of CogVLM / CogVLM2, PIL + torch only.

CogVLM's eval transform (THUDM/CogVLM @f7283b2 ``utils/utils/vision.py`` ``BlipImageEvalProcessor``; the
``build_conversation_input_ids`` transform of the HF ``cogvlm-chat-hf`` / ``cogvlm2-llama3-*`` code) is BLIP-2's:
RGB → resize to exactly size×size bicubic (no crop, aspect ratio not kept) → [0, 1] → CLIP mean/std. It is the
VisualGLM processor with CogVLM's default size (490 px; 224 for the base-224 model, 1344 for CogVLM2), so this
class only changes that default. Deliberate differences: as ``VisualGLMImageProcessor`` (no torchvision, paths or
PIL images, clear errors on unreadable files, float32 output).
"""

from .image_processing_visualglm import CLIP_MEAN, CLIP_STD, VisualGLMImageProcessor


class CogVLMImageProcessor(VisualGLMImageProcessor):
    """PIL image(s) or path(s) → ``pixel_values`` float32 (N, 3, size, size), normalized with CLIP mean/std."""

    def __init__(self, size=490, image_mean=CLIP_MEAN, image_std=CLIP_STD, **kwargs):
        super().__init__(size=size, image_mean=image_mean, image_std=image_std, **kwargs)


__all__ = ["CogVLMImageProcessor"]
