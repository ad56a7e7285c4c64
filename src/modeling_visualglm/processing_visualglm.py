"""VisualGLM-6B processor: prompt format, image placeholders, chat template and answer post-processing.

Implements the prompt and input assembly of VisualGLM-6B (THUDM/VisualGLM-6B @e314fb9: ``model/chat.py``
``chat``/``process_image``/``process_response``, ``model/infer_util.py`` ``is_chinese``; HF
``ChatGLMForConditionalGenerationWithImage.build_inputs_with_image``/``chat`` in ``modeling_chatglm.py`` of
THUDM/visualglm-6b, git mirror greensheng/chatglm-6b branch ``visual`` @11f77d9):

    prompt  = "<img></img>" (only with an image, always at the very start)
              + "问：{q}\\n答：{r}\\n" per history turn + "问：{query}\\n答："
              (English: "Q:{q}\\nA:{r}\\n" … "Q:{query}\\nA:")
    ids     = encode("<img>") + 32 image placeholders + encode("</img>问：…\\n答：") + [gMASK, <sop>]

Each of the two text pieces is encoded on its own, so each gets SentencePiece's "▁" dummy prefix; without an
image the prompt is encoded whole (``tokenizer(prompt)``), as in the originals.

Deliberate differences from the original:
- The placeholders are the tokenizer's dedicated ``<image>`` id instead of ``<unk>`` (HF) or
  ``<pad>`` (SAT); the model replaces their embeddings, so the id never reaches the network.
- ``english=None`` picks the English format when the query has no character in U+4E00..U+9FA5, the rule
  VisualGLM's ``api.py``/``web_demo.py`` apply through ``is_chinese``; the SAT ``chat`` defaults to Chinese
  and the HF ``chat`` only knows Chinese (pass ``english=False`` to force that).
- The processor also works on batches (left padding), checks that images and ``<img></img>`` markers match,
  and rejects empty queries and malformed histories with errors naming the problem.
- User text is always text (the originals read ``[gMASK]``, ``<sop>``, ``<eop>``, ``<pad>``, ``<unk>`` typed by a
  user as control ids). Prompts are encoded with ``split_special_tokens=True``: SentencePiece never produces a
  CONTROL piece from text, so the only control ids are the ``[gMASK], <sop>`` the template appends. The image slot
  is structural: only a ``<img></img>`` at the very start of a prompt (where the template puts it; every user turn
  starts after "问：" / "Q:") is replaced by the image; ``<img></img>`` anywhere else is encoded as text. The one
  string refused in user text is the placeholder ``<image>`` itself (ValueError), so that a decoded prompt never
  shows a fake image run.
- A Jinja chat template renders the same prompt from ``messages`` (one image per conversation, as the model
  was trained; the image goes first wherever it appears in the messages).
"""

from __future__ import annotations

import re

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .chat_utils import JINJA_TEXT_OF, check_history, encode_text, jinja_check_roles, prompt_list
from .compat import legacy_processor_attributes
from .image_processing_visualglm import flatten_images

IMAGE_MARKER = "<img></img>"
IMAGE_OPEN, IMAGE_CLOSE = "<img>", "</img>"
DEFAULT_NUM_IMAGE_TOKENS = 32

# is_chinese() of VisualGLM's infer_util.py: the CJK Unified Ideographs block up to U+9FA5
_CHINESE = re.compile("[\u4e00-\u9fa5]")
# process_response(): ASCII punctuation next to a CJK ideograph (U+4E00..U+9FFF) becomes full-width
_PUNCTUATION = [(",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？")]

# The same prompt as build_visualglm_prompt. "english" may be passed to apply_chat_template; when it is not,
# the last user message decides (no character in U+4E00..U+9FA5 → English). Content may be a string or a
# list of {"type": "text"|"image", ...} blocks.
VISUALGLM_CHAT_TEMPLATE = (
    JINJA_TEXT_OF
    + "{%- set ns = namespace(image=false, query='', chinese=false) -%}"
    "{%- for message in messages -%}"
    + jinja_check_roles("VisualGLM-6B")
    + "{%- if message['content'] is not string -%}{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'image' -%}"
    "{%- if ns.image -%}{{ raise_exception('VisualGLM-6B takes at most one image per conversation') }}{%- endif -%}"
    "{%- set ns.image = true -%}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.query = text_of(message) -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if english is defined and english is not none -%}{%- set ns.chinese = not english -%}"
    "{%- else -%}{%- for ch in ns.query -%}"
    "{%- if ch >= '\u4e00' and ch <= '\u9fa5' -%}{%- set ns.chinese = true -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- set q = '问：' if ns.chinese else 'Q:' -%}"
    "{%- set a = '答：' if ns.chinese else 'A:' -%}"
    "{%- if ns.image -%}<img></img>{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ q }}{{ text_of(message) }}{{ '\\n' }}"
    "{%- else -%}{{ a }}{{ text_of(message) }}{{ '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ a }}{%- endif -%}"
)


def is_chinese(text: str) -> bool:
    """True when ``text`` has a CJK ideograph in U+4E00..U+9FA5 (VisualGLM's ``is_chinese``)."""
    return _CHINESE.search(text) is not None


def _check_query(query) -> None:
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    if not query.strip():
        raise ValueError("query is empty")


def build_visualglm_prompt(query: str, history=None, has_image: bool = True, english: bool | None = None) -> str:
    """The VisualGLM prompt text: ``<img></img>`` first when there is an image, then the history turns and the
    query as "问：…\\n答：…" (or "Q:…\\nA:…"). ``english=None``: English iff ``query`` has no CJK ideograph."""
    _check_query(query)
    turns = check_history(history)
    if english is None:
        english = not is_chinese(query)
    q, a = ("Q:", "A:") if english else ("问：", "答：")
    prompt = IMAGE_MARKER if has_image else ""
    for old_query, response in turns:
        prompt += f"{q}{old_query}\n{a}{response}\n"
    return prompt + f"{q}{query}\n{a}"


def build_visualglm_inputs(
    tokenizer,
    query: str,
    history=None,
    has_image: bool = True,
    num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
    english: bool | None = None,
) -> list[int]:
    """Token ids of one VisualGLM prompt, ending in ``[gMASK], <sop>``; with an image, ``num_image_tokens``
    copies of ``tokenizer.image_token_id`` follow the ids of "<img>". Text typed by the user (query, history)
    never becomes a control id."""
    prompt = build_visualglm_prompt(query, history, has_image=has_image, english=english)
    _check_no_placeholder(prompt, tokenizer)
    return encode_visualglm_prompt(tokenizer, prompt, num_image_tokens)


def encode_visualglm_prompt(
    tokenizer, prompt: str, num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS, add_special_tokens: bool = True
) -> list[int]:
    """Ids of one formatted prompt. A ``<img></img>`` that opens the prompt is the image slot: ``encode("<img>")``
    + ``num_image_tokens`` placeholders + ``encode("</img>…")`` (two SentencePiece inputs, each with its own "▁",
    as the original's ``text.rfind("<img>") + 5`` split); without it the prompt is one input. Special-token
    strings anywhere in the text are encoded as text; ``[gMASK], <sop>`` are appended (``add_special_tokens``)."""
    if prompt.startswith(IMAGE_MARKER):
        split = len(IMAGE_OPEN)
        ids = (
            encode_text(tokenizer, prompt[:split])
            + [tokenizer.image_token_id] * num_image_tokens
            + encode_text(tokenizer, prompt[split:])
        )
    else:
        ids = encode_text(tokenizer, prompt)
    return tokenizer.build_inputs_with_special_tokens(ids) if add_special_tokens else ids


def _check_no_placeholder(text: str, tokenizer) -> None:
    token = str(tokenizer.image_token)
    if token in text:
        raise ValueError(
            f"text contains the image placeholder token {token!r}; mark an image with {IMAGE_MARKER!r} instead"
        )


def process_response(response: str) -> str:
    """VisualGLM's answer clean-up: strip, "[[训练时间]]" → "2023年", and ASCII , ! : ; ? directly before or
    after a CJK ideograph (U+4E00..U+9FFF) → the full-width form. Each mark is handled in turn, first where it
    follows an ideograph, then where it precedes one; matches do not overlap (``re.sub``)."""
    response = response.strip().replace("[[训练时间]]", "2023年")
    for ascii_mark, full_width in _PUNCTUATION:
        mark = re.escape(ascii_mark)
        response = re.sub(f"([\u4e00-\u9fff]){mark}", lambda m: m.group(1) + full_width, response)
        response = re.sub(f"{mark}([\u4e00-\u9fff])", lambda m: full_width + m.group(1), response)
    return response


@legacy_processor_attributes
class VisualGLMProcessor(ProcessorMixin):
    """Images + VisualGLM prompts → ``input_ids``, ``attention_mask`` (left-padded) and ``pixel_values``.

    ``text`` is one or more formatted prompts (see :func:`build_visualglm_prompt` or the chat template); a prompt
    that starts with ``<img></img>`` (where the template puts the image) takes one image: the marker becomes
    ``<img>`` + ``num_image_tokens`` × ``<image>`` + ``</img>``. ``<img></img>`` elsewhere, and every special-token
    string, is text. ``pixel_values`` (N, 3, H, W) holds the given images in the order of their prompts.
    """

    _auto_class = "AutoProcessor"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
        chat_template=None,
        **kwargs,
    ):
        self.num_image_tokens = int(num_image_tokens)
        if chat_template is None:
            chat_template = VISUALGLM_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @property
    def image_token(self) -> str:
        return str(self.tokenizer.image_token)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.image_token_id

    def __call__(self, images=None, text=None, padding=True, return_tensors="pt", **kwargs) -> BatchFeature:
        if text is None:
            raise ValueError("VisualGLMProcessor needs text: prompt(s) with '<img></img>' where an image goes")
        for name in ("videos", "audio"):
            if kwargs.pop(name, None) is not None:
                raise ValueError("VisualGLM takes images only, no videos or audio")
        texts = prompt_list(text)
        flat_images = flatten_images(images)
        # the image slot is structural: a marker that opens the prompt (user text always follows "问：" / "Q:")
        markers = [int(t.startswith(IMAGE_MARKER)) for t in texts]
        if sum(markers) != len(flat_images):
            raise ValueError(
                f"{sum(markers)} '{IMAGE_MARKER}' marker(s) at the start of the prompts (per prompt: {markers}) but "
                f"{len(flat_images)} image(s) given; each image needs exactly one marker, at the start of its prompt "
                f"(a '{IMAGE_MARKER}' anywhere else is text)"
            )
        for t in texts:
            _check_no_placeholder(t, self.tokenizer)

        image_kwargs = dict(kwargs.pop("images_kwargs", None) or {})
        text_kwargs = dict(kwargs.pop("text_kwargs", None) or {})
        if "size" in kwargs:
            image_kwargs["size"] = kwargs.pop("size")
        text_kwargs.update(kwargs)
        add_special_tokens = text_kwargs.pop("add_special_tokens", True)
        if text_kwargs.pop("truncation", None):
            raise ValueError("VisualGLMProcessor does not truncate: a cut would split the image run or drop the "
                             "[gMASK] <sop> tail; shorten the prompt instead")
        pad_kwargs = {k: text_kwargs.pop(k) for k in _PAD_KWARGS if k in text_kwargs}
        unknown = sorted(k for k, v in text_kwargs.items() if v is not None and k not in _IGNORED_KWARGS)
        if unknown:
            raise TypeError(f"unexpected arguments {unknown}; VisualGLMProcessor takes images, text, padding, "
                            f"return_tensors, size, add_special_tokens and {list(_PAD_KWARGS)}")

        rows = [
            encode_visualglm_prompt(self.tokenizer, t, self.num_image_tokens, add_special_tokens=add_special_tokens)
            for t in texts
        ]
        encoding = self.tokenizer.pad({"input_ids": rows}, padding=padding, **pad_kwargs)
        data = {k: encoding[k] for k in ("input_ids", "attention_mask") if k in encoding}
        if flat_images:
            data["pixel_values"] = self.image_processor(flat_images, return_tensors="pt", **image_kwargs)[
                "pixel_values"
            ]
        return BatchFeature(data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


# what tokenizer.pad takes; template variables (english) that apply_chat_template passes on are ignored
_PAD_KWARGS = ("max_length", "pad_to_multiple_of", "padding_side", "return_attention_mask")
_IGNORED_KWARGS = ("english",)
