"""CogVLM / CogVLM2 processor: prompt templates, image placeholders, answer clean-up and grounding boxes.

Implements the input assembly of THUDM's HF CogVLM code (``build_conversation_input_ids`` and
``_history_to_prompt`` of ``cogvlm-chat-hf`` / ``cogvlm2-llama3-chat-19B``; the same templates as THUDM/CogVLM
@f7283b2 ``utils/utils/template.py`` / ``language.py``) and the grounding format of the CogVLM grounding models
(``utils/utils/grounding_parser.py``):

    input_ids = [bos] + [image_token_id] × num_image_tokens (only with an image) + encode(prompt, no specials)

    template  prompt (history = [(q, a), ...])
    base      "{query}"                                   (history is ignored, as in the original)
    chat      "Question: {q} Answer: {a}\\n" … "Question: {query} Answer:"      (CogVLM1 chat, all of CogVLM2)
    vqa       "Question: {q} Short answer: {a}\\n" … "Question: {query} Short answer:"
    text      "A chat between … questions. USER: {q} ASSISTANT: {a}\\n" … "USER: {query} ASSISTANT:"

Grounding answers carry boxes as ``[[x0,y0,x1,y1]]`` in thousandths of the image (000–999, top-left origin),
several boxes of one phrase separated by ``;`` inside one bracket pair.

Deliberate differences from the originals:
- The placeholders are a dedicated ``image_token_id`` (default: the text vocab size, which the LM head can never
  produce) instead of the pad id; the model derives ``token_type_ids`` from them.
- ``text`` is the text-only format of the CogVLM/CogVLM2 CLI demos written out cleanly: the demos feed it
  through the ``chat`` template a second time (CogVLM2: history appears twice; CogVLM1 formats a Python list),
  which is not reproduced.
- Batches are left-padded by the processor; boxes with a wrong number of coordinates, non-integers, values
  above 999 or reversed corners raise ``ValueError`` (the original parser silently drops them), and pixel
  coordinates are computed in integers (``v * size // 1000``) instead of ``int(v / 1000 * size)``.
- A Jinja chat template renders the same prompt from ``messages`` for the processor's ``template_version`` (at
  most one image per conversation; it goes right after bos wherever it appears in the messages).
- User text is always text: the prompt holds no control tokens (bos and the image block are added as ids), so it
  is encoded with ``split_special_tokens=True`` and ``<s>``, ``</s>``, ``<unk>`` (CogVLM2: ``<|begin_of_text|>``,
  ``<|eot_id|>`` …) typed by a user are plain text; the original read them as control ids.
- Image sizes and box coordinates must be finite and at most ``MAX_IMAGE_SIDE`` pixels: anything else (inf, NaN,
  1e307, bools) is a ``ValueError`` instead of an ``OverflowError`` or a silent cast.
"""

from __future__ import annotations

import re

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from .chat_utils import (
    JINJA_COUNT_IMAGES, JINJA_TEXT_OF, check_history, encode_text, image_kwargs_of, jinja_check_roles, jinja_string,
    left_pad, prompt_list,
)
from .compat import legacy_processor_attributes

TEMPLATES = ("base", "chat", "vqa", "text")
TEXT_ONLY_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE = 0, 1


def _check_query(query) -> None:
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    if not query.strip():
        raise ValueError("query is empty")


def build_cogvlm_prompt(query: str, history=None, template: str = "chat") -> str:
    """The text after the image block for one turn (see the module docstring for the formats)."""
    _check_query(query)
    turns = check_history(history)
    if template == "base":
        return query
    if template in ("chat", "vqa"):
        answer = "Answer:" if template == "chat" else "Short answer:"
        prompt = "".join(f"Question: {q} {answer} {a}\n" for q, a in turns)
        return prompt + f"Question: {query} {answer}"
    if template == "text":
        prompt = TEXT_ONLY_SYSTEM + " "
        prompt += "".join(f"USER: {q} ASSISTANT: {a}\n" for q, a in turns)
        return prompt + f"USER: {query} ASSISTANT:"
    raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")


# Roles and image count of a conversation, checked before anything is rendered.
_CHECK_MESSAGES = (
    "{%- set ns = namespace(images=0) -%}"
    "{%- for message in messages -%}"
    + jinja_check_roles("CogVLM")
    + JINJA_COUNT_IMAGES
    + "{%- endfor -%}"
    "{%- if ns.images > 1 -%}{{ raise_exception('CogVLM takes at most one image per conversation') }}{%- endif -%}"
)
# build_cogvlm_prompt as turns: a user message renders as "Question: {q} ", an assistant message as "Answer: {a}\n",
# the generation prompt as "Answer:" (so history + query + generation prompt is exactly the builder's string, and an
# assistant message at the end is an answer to continue). "base" renders the last query alone (plus a trailing
# assistant message to continue). The image is not in the text: the processor puts its placeholders after bos.
_RENDER = (
    "{%- if version == 'base' -%}"
    "{%- set last = namespace(query='', answer='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set last.query = text_of(message) -%}{%- set last.answer = '' -%}"
    "{%- else -%}{%- set last.answer = text_of(message) -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{ last.query }}{{ last.answer }}"
    "{%- else -%}"
    "{%- if version == 'text' -%}{{ TEXT_SYSTEM }}{{ ' ' }}{%- endif -%}"
    "{%- set user = 'USER: ' if version == 'text' else 'Question: ' -%}"
    "{%- set answer = {'chat': 'Answer:', 'vqa': 'Short answer:', 'text': 'ASSISTANT:'}[version] -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ user }}{{ text_of(message) }}{{ ' ' }}"
    "{%- else -%}{{ answer }}{{ ' ' }}{{ text_of(message) }}{{ '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ answer }}{%- endif -%}"
    "{%- endif -%}"
)


def cogvlm_chat_template(template_version: str = "chat") -> str:
    """The Jinja chat template rendering :func:`build_cogvlm_prompt` for ``template_version`` (base | chat | vqa |
    text); ``apply_chat_template(..., template_version=...)`` picks another template for one call."""
    if template_version not in TEMPLATES:
        raise ValueError(f"template_version must be one of {TEMPLATES}, got {template_version!r}")
    return (
        JINJA_TEXT_OF
        + "{%- set TEXT_SYSTEM = " + jinja_string(TEXT_ONLY_SYSTEM) + " -%}"
        + "{%- if template_version is defined and template_version is not none -%}"
        + "{%- set version = template_version -%}"
        + "{%- else -%}{%- set version = " + jinja_string(template_version) + " -%}{%- endif -%}"
        + "{%- if version not in " + repr(list(TEMPLATES)) + " -%}"
        + "{{ raise_exception('template_version must be one of " + ", ".join(TEMPLATES) + ", got ' + version) }}"
        + "{%- endif -%}"
        + _CHECK_MESSAGES
        + _RENDER
    )


def build_cogvlm_inputs(
    tokenizer, prompt: str, has_image: bool, num_image_tokens: int, image_token_id: int
) -> list[int]:
    """``[bos] + [image_token_id] * num_image_tokens (with an image) + encode(prompt)``."""
    if tokenizer.bos_token_id is None:
        raise ValueError("the tokenizer has no bos token; CogVLM prompts start with bos")
    ids = [tokenizer.bos_token_id]
    if has_image:
        ids += [image_token_id] * num_image_tokens
    return ids + encode_text(tokenizer, prompt)


def process_response(response: str, stop_strings=("</s>", "<|end_of_text|>", "<|eot_id|>")) -> str:
    """Cut at the first stop string (the demos split on ``</s>`` / ``<|end_of_text|>``) and strip."""
    for stop in stop_strings:
        response = response.split(stop)[0]
    return response.strip()


def cogvlm_token_type_ids(input_ids: torch.Tensor, image_token_id: int) -> torch.LongTensor:
    """HF CogVLM's ``token_type_ids`` for ``input_ids``: VISION (1) on the placeholders, LANGUAGE (0) elsewhere."""
    return (input_ids == image_token_id).long()


@legacy_processor_attributes
class CogVLMProcessor(ProcessorMixin):
    """Images + formatted CogVLM prompts → ``input_ids``, ``attention_mask`` (left-padded) and ``pixel_values``.

    ``text``: one prompt or a list (already templated, see :func:`build_cogvlm_prompt` or the chat template, which
    renders ``template_version``'s format). ``images``: None, one image for one prompt, or a list aligned with
    ``text`` whose entries are an image, None (text-only row) or a list of at most one image (what
    ``apply_chat_template`` passes). The image of a row goes right after its bos, as in the original;
    ``pixel_values`` holds the given images in row order.
    """

    _auto_class = "AutoProcessor"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 1227,
        image_token_id: int = 32000,
        pad_token_id: int | None = None,
        template_version: str = "chat",
        chat_template=None,
        **kwargs,
    ):
        self.num_image_tokens = int(num_image_tokens)
        self.image_token_id = int(image_token_id)
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0
        self.template_version = template_version
        if chat_template is None:
            chat_template = cogvlm_chat_template(template_version)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def build_prompt(self, query: str, history=None, template: str | None = None) -> str:
        return build_cogvlm_prompt(query, history, template or self.template_version)

    def __call__(self, images=None, text=None, videos=None, audio=None, return_tensors="pt", **kwargs) -> BatchFeature:
        if text is None:
            raise ValueError("CogVLMProcessor needs text: formatted prompt(s), e.g. from build_prompt()")
        if videos is not None or audio is not None:
            raise ValueError("CogVLM takes images only, no videos or audio")
        single = isinstance(text, str)
        texts = prompt_list(text)
        if images is None:
            row_images = [None] * len(texts)
        elif single:  # everything given belongs to the one prompt: an image, [image], [[image]] or []
            row_images = [images]
        else:
            row_images = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(row_images) != len(texts):
            raise ValueError(
                f"{len(row_images)} image entries for {len(texts)} prompts: give one image (or None) per prompt; "
                "CogVLM takes at most one image per conversation"
            )
        row_images = [_row_image(entry, row) for row, entry in enumerate(row_images)]
        image_kwargs = image_kwargs_of(kwargs, _IGNORED_KWARGS, "CogVLMProcessor")
        rows = [
            build_cogvlm_inputs(self.tokenizer, t, img is not None, self.num_image_tokens, self.image_token_id)
            for t, img in zip(texts, row_images)
        ]
        data = left_pad(rows, self.pad_token_id)
        given = [img for img in row_images if img is not None]
        if given:
            data["pixel_values"] = self.image_processor(given, return_tensors="pt", **image_kwargs)["pixel_values"]
        return BatchFeature(data, tensor_type=return_tensors)

    def decode(self, token_ids, **kwargs) -> str:
        kwargs.setdefault("skip_special_tokens", True)
        return process_response(self.tokenizer.decode(token_ids, **kwargs))

    def post_process_grounding(self, response: str, image_size):
        return parse_grounding(response, image_size)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


def _row_image(entry, row: int):
    """One prompt's image: an image, None, or a list of at most one image (``apply_chat_template``'s nesting)."""
    while isinstance(entry, (list, tuple)):
        if len(entry) > 1:
            raise ValueError(f"prompt {row} has {len(entry)} images; CogVLM takes at most one image per conversation")
        entry = entry[0] if entry else None
    return entry


# Arguments apply_chat_template / pipelines pass to every processor that mean nothing here: the ids always start with
# bos and rows are always left-padded (as in the original); on transformers 4.57.x apply_chat_template also passes
# the template's own variables (template_version) on to the processor call.
_IGNORED_KWARGS = ("add_special_tokens", "padding", "text_kwargs", "template_version")


# ---------------------------------------------------------------------------------------------------
# Grounding
# ---------------------------------------------------------------------------------------------------

_BOX_GROUP = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
_COORD = re.compile(r"\s*([0-9]{1,3})\s*")


# Larger than any image PIL opens by default (its bomb limit is ~179M pixels); keeps the integer arithmetic exact
# and rules out sizes that only an attacker or a bug would pass.
MAX_IMAGE_SIDE = 1 << 20


def _number(value, what: str) -> float:
    """``value`` as a float: ints, floats and NumPy/torch scalars; bools, strings and the like are refused."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int too large for a float
        raise ValueError(f"{what} must be a number within +-{MAX_IMAGE_SIDE}, got {value!r}") from None
    if number != number or abs(number) > MAX_IMAGE_SIDE:  # NaN, inf, 1e307
        raise ValueError(f"{what} must be a finite number within +-{MAX_IMAGE_SIDE}, got {value!r}")
    return number


def _dimension(value, what: str) -> int:
    number = _number(value, what)
    if number < 1:
        raise ValueError(f"{what} must be at least 1 pixel, got {value!r}")
    return int(number)


def _image_size(image_size) -> tuple[int, int]:
    if hasattr(image_size, "size") and not isinstance(image_size, (tuple, list)):
        image_size = image_size.size  # a PIL image: (width, height)
    try:
        width, height = image_size
    except (TypeError, ValueError):
        raise ValueError(f"image size must be (width, height) or a PIL image, got {image_size!r}") from None
    return _dimension(width, "image width"), _dimension(height, "image height")


def parse_boxes(box_text: str, image_size) -> list[tuple[int, int, int, int]]:
    """``"x0,y0,x1,y1;x0,y0,x1,y1"`` (thousandths, 000–999) → pixel boxes (x0, y0, x1, y1) of an image of
    ``image_size`` = (width, height) or a PIL image."""
    width, height = _image_size(image_size)
    boxes = []
    for part in box_text.split(";"):
        coords = part.split(",")
        if len(coords) != 4 or not all(_COORD.fullmatch(c) for c in coords):
            raise ValueError(
                f"malformed grounding box {part.strip()!r} in [[{box_text}]]: expected four integers 000-999 "
                "as x0,y0,x1,y1"
            )
        x0, y0, x1, y1 = (int(c) for c in coords)
        if x0 > x1 or y0 > y1:
            raise ValueError(f"grounding box {part.strip()!r} has its corners reversed (need x0<=x1, y0<=y1)")
        # thousandths of the original image, top-left origin
        boxes.append((x0 * width // 1000, y0 * height // 1000, x1 * width // 1000, y1 * height // 1000))
    return boxes


def parse_grounding(response: str, image_size) -> list[dict]:
    """Every ``[[...]]`` group of a grounding answer, in order, as
    ``{"phrase": text since the previous group, "boxes": [pixel boxes], "span": (start, end)}``.

    The phrase is the text between the previous box group (or the start) and this one, stripped of spaces and
    punctuation: a simple stand-in for the original demo's spaCy noun-chunk search. A ``[[`` without ``]]``
    raises ``ValueError``.
    """
    groups = []
    last_end = 0
    for match in _BOX_GROUP.finditer(response):
        if "[[" in response[last_end : match.start()]:
            raise ValueError(f"unterminated grounding box near {response[last_end:match.start() + 2]!r}")
        phrase = response[last_end : match.start()].strip(" \t\n,.;:!?")
        groups.append({"phrase": phrase, "boxes": parse_boxes(match.group(1), image_size),
                       "span": (match.start(), match.end())})
        last_end = match.end()
    if "[[" in response[last_end:]:
        raise ValueError(f"unterminated grounding box in {response[last_end:]!r}")
    return groups


def format_box(box, image_size) -> str:
    """A pixel box (x0, y0, x1, y1) → ``[[x0,y0,x1,y1]]`` in thousandths (3 digits), for grounding prompts."""
    width, height = _image_size(image_size)
    try:
        x0, y0, x1, y1 = box
    except (TypeError, ValueError):
        raise ValueError(f"a box is four numbers (x0, y0, x1, y1), got {box!r}") from None
    x0, y0, x1, y1 = (_number(v, name) for v, name in zip((x0, y0, x1, y1), ("x0", "y0", "x1", "y1")))
    scaled = [x0 * 1000 / width, y0 * 1000 / height, x1 * 1000 / width, y1 * 1000 / height]
    return "[[" + ",".join(f"{min(999, max(0, int(round(v)))):03d}" for v in scaled) + "]]"


def draw_grounding(image, grounding, width: int = 3, colors=None):
    """Draw parsed grounding (``parse_grounding`` output, or a response string) on a copy of a PIL image:
    one outlined rectangle per box, labelled with its phrase."""
    from PIL import ImageDraw

    if isinstance(grounding, str):
        grounding = parse_grounding(grounding, image)
    palette = colors or [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                         (70, 240, 240), (240, 50, 230), (128, 128, 0)]
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    for i, group in enumerate(grounding):
        color = palette[i % len(palette)]
        for box in group["boxes"]:
            draw.rectangle(box, outline=color, width=width)
            if group["phrase"]:
                draw.text((box[0] + width, box[1] + width), group["phrase"], fill=color)
    return out


__all__ = [
    "CogVLMProcessor",
    "build_cogvlm_prompt",
    "cogvlm_chat_template",
    "build_cogvlm_inputs",
    "cogvlm_token_type_ids",
    "draw_grounding",
    "encode_text",
    "format_box",
    "parse_boxes",
    "parse_grounding",
    "process_response",
]
