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
- The placeholders are the tokenizer's dedicated ``<image>`` id (CONTRACTS §4) instead of ``<unk>`` (HF) or
  ``<pad>`` (SAT); the model replaces their embeddings, so the id never reaches the network.
- ``english=None`` picks the English format when the query has no character in U+4E00..U+9FA5, the rule
  VisualGLM's ``api.py``/``web_demo.py`` apply through ``is_chinese``; the SAT ``chat`` defaults to Chinese
  and the HF ``chat`` only knows Chinese (pass ``english=False`` to force that).
- The processor also works on batches (left padding), checks that images and ``<img></img>`` markers match,
  and rejects empty queries and malformed histories with errors naming the problem.
- A Jinja chat template renders the same prompt from ``messages`` (one image per conversation, as the model
  was trained; the image goes first wherever it appears in the messages).
"""

from __future__ import annotations

import re

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .chat_utils import check_history
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
    "{%- macro text_of(message) -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'text' -%}{{ block['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(image=false, query='', chinese=false) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['user', 'assistant'] -%}"
    "{{ raise_exception('VisualGLM-6B knows only user and assistant messages, got role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('messages must alternate user/assistant, starting with user') }}"
    "{%- endif -%}"
    "{%- if message['content'] is not string -%}{%- for block in message['content'] -%}"
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
    copies of ``tokenizer.image_token_id`` follow the ids of "<img>"."""
    prompt = build_visualglm_prompt(query, history, has_image=has_image, english=english)
    _check_no_placeholder(prompt, tokenizer)
    if not has_image:
        return tokenizer(prompt)["input_ids"]
    split = len(IMAGE_OPEN)  # the image sits right after "<img>" (original: text.rfind("<img>") + 5)
    before = tokenizer.encode(prompt[:split], add_special_tokens=False)
    after = tokenizer.encode(prompt[split:], add_special_tokens=False)
    ids = before + [tokenizer.image_token_id] * num_image_tokens + after
    return tokenizer.build_inputs_with_special_tokens(ids)


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

    ``text`` is one or more formatted prompts (see :func:`build_visualglm_prompt` or the chat template) with
    ``<img></img>`` where an image goes; each marker becomes ``<img>`` + ``num_image_tokens`` × ``<image>`` +
    ``</img>``, and ``pixel_values`` (N, 3, H, W) holds the given images in the order of their markers.
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
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a non-empty list of strings")
        flat_images = flatten_images(images)
        markers = [t.count(IMAGE_MARKER) for t in texts]
        if sum(markers) != len(flat_images):
            raise ValueError(
                f"{sum(markers)} '{IMAGE_MARKER}' marker(s) in the text (per prompt: {markers}) but "
                f"{len(flat_images)} image(s) given; each image needs exactly one marker"
            )
        for t in texts:
            _check_no_placeholder(t, self.tokenizer)

        image_kwargs = dict(kwargs.pop("images_kwargs", None) or {})
        text_kwargs = dict(kwargs.pop("text_kwargs", None) or {})
        if "size" in kwargs:
            image_kwargs["size"] = kwargs.pop("size")
        text_kwargs.update(kwargs)

        expanded_marker = IMAGE_OPEN + self.image_token * self.num_image_tokens + IMAGE_CLOSE
        expanded = [t.replace(IMAGE_MARKER, expanded_marker) for t in texts]
        encoding = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors, **text_kwargs)

        image_id = self.image_token_id
        for row, count in enumerate(markers):
            found = sum(1 for i in _as_list(encoding["input_ids"][row]) if i == image_id)
            if found != count * self.num_image_tokens:
                raise ValueError(
                    f"prompt {row} has {found} image tokens after tokenization, expected "
                    f"{count * self.num_image_tokens} (was it truncated?)"
                )

        data = dict(encoding)
        if flat_images:
            data["pixel_values"] = self.image_processor(flat_images, return_tensors="pt", **image_kwargs)[
                "pixel_values"
            ]
        return BatchFeature(data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


def _as_list(row) -> list[int]:
    return row.tolist() if hasattr(row, "tolist") else list(row)
