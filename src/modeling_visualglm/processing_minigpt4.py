"""MiniGPT-4 prompts, legacy-SentencePiece segment tokenization, answer post-processing, and its tokenizer.

Implements the conversation handling of Vision-CAIR/MiniGPT-4 (@ef1ac08 ``minigpt4/conversation/conversation.py``
``CONV_VISION_Vicuna0`` / ``CONV_VISION_LLama2`` and ``Chat.get_context_emb`` / ``Chat.answer``; HEAD
``CONV_VISION_minigptv2``), spec minigpt4.md §1.7-1.8:

- Vicuna-v0: ``{system}###Human: <Img><ImageHere></Img> {q}###Assistant: `` (SINGLE style, sep ``###``);
- LLaMA-2:  ``{system}<s>[INST] <Img><ImageHere></Img> {q} [/INST] `` (sep ``""``);
- MiniGPT-v2: ``<s>[INST] <Img><ImageHere></Img> {q} [/INST]`` (no system prompt).

The original splits the prompt at ``<ImageHere>``, tokenizes every segment separately with the slow
(legacy) SentencePiece ``LlamaTokenizer`` (BOS on the first segment only) and splices the image embeddings
in between. Here the image becomes a run of ``image_token_id`` placeholders between the segment ids.

Deliberate differences:
- Legacy tokenization is reproduced on transformers 5's tokenizers-backed ``LlamaTokenizer``: a literal
  ``<s>`` inside a segment becomes the BOS id and the text after it is encoded as a new SentencePiece
  input (with its dummy-prefix ``▁``), as the slow tokenizer did; v5's ``legacy=False`` encoding would
  drop that ``▁`` (the SentencePiece ``add_dummy_prefix`` behaviour of LLaMA's tokenizer.model).
- ``###`` stops generation through transformers' ``stop_strings`` (any tokenization of ``###``), where the
  original compared the tail to the two LLaMA id sequences [835] and [2277, 29937].
- A Jinja chat template per variant renders the same prompt from ``messages`` (at most one image per conversation,
  placed in the first user message wherever it appears: the demo uploads the image before the first question).

User text (query and history) is always text; the original's legacy tokenizer read a ``<s>`` / ``</s>`` typed by
a user as BOS / EOS. The prompt builder marks the template's own ``<s>`` (LLaMA-2 / MiniGPT-v2 ``<s>[INST]``) and
the image slot structurally, and every stretch of text between them is encoded with ``split_special_tokens=True``;
for text without special-token strings the ids are exactly the legacy ones. Two strings are refused rather than
encoded:

- ``<ImageHere>`` in the query or in any history turn: ``ValueError`` naming where. It is the image mark of the
  formatted prompts that :class:`MiniGPT4Processor` and the chat template exchange as strings, so letting a user
  write it would make an image slot nobody asked for on that path; refusing it everywhere keeps the chat,
  builder, template and processor paths in agreement (the chat template refuses it too).
- An empty (or all-whitespace) query: ``ValueError`` (the original sent an empty question to the model).

:class:`MiniGPT4Processor` takes formatted prompt strings; there ``<s>`` is BOS only where the variant's template
puts it (at each ``<s>[INST] ``, and the one the chat template starts with), and any other ``<s>`` / ``</s>`` is
text. A user who types the whole role string ``<s>[INST] `` into a prompt given to the processor cannot be told
from the template (a string carries no structure); ``chat`` and :func:`build_minigpt4_inputs` have no such gap.

Servers that tokenize the rendered chat template in one call (vLLM) see the same ids as the processor: the
tokenizer maps ``<ImageHere>`` to the placeholder id and reads text after a special token as the legacy tokenizer
did (see :class:`MiniGPT4Tokenizer`); they expand the one marker to ``num_image_tokens`` placeholders themselves.
"""

from __future__ import annotations

import re

from transformers import AddedToken
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .chat_utils import (
    JINJA_COUNT_IMAGES, JINJA_TEXT_OF, check_history, encode_text, image_kwargs_of, jinja_check_roles, jinja_string,
    left_pad, prompt_list,
)
from .compat import legacy_processor_attributes, llama_tokenizer_class
from .image_processing_visualglm import flatten_images

IMAGE_SEGMENT = "<Img><ImageHere></Img>"
IMAGE_HERE = "<ImageHere>"
SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it "
    "to you. Please answer my questions."
)
# (system, user role, assistant role, separator) — the SINGLE separator style of MiniGPT-4's Conversation
TEMPLATES = {
    "vicuna0": (SYSTEM, "Human: ", "Assistant: ", "###"),
    "llama2": (SYSTEM, "<s>[INST] ", " [/INST] ", ""),
    "minigptv2": ("", "<s>[INST] ", " [/INST]", ""),
}
# demo.py passes the "###" stopping criteria for both MiniGPT-4 variants; MiniGPT-v2 stops on </s> only
STOP_STRINGS = {"vicuna0": ["###"], "llama2": ["###"], "minigptv2": []}


class _Slot(str):
    """A template-made control position in a prompt's parts (BOS, EOS or the image); rendered as its string."""


BOS, EOS, IMAGE = _Slot("<s>"), _Slot("</s>"), _Slot(IMAGE_HERE)
_LEGACY_SPECIALS = re.compile("(<s>|</s>)")


def _template_parts(text: str) -> list:
    """A template string (ours, never the user's) as parts: its literal ``<s>`` / ``</s>`` become slots."""
    slots = {"<s>": BOS, "</s>": EOS}
    return [slots.get(piece, piece) for piece in _LEGACY_SPECIALS.split(text) if piece]


def _check_user_text(text: str, where: str) -> None:
    if IMAGE_HERE in text:
        raise ValueError(
            f"{where} contains the image marker {IMAGE_HERE!r}, which MiniGPT-4 reserves for the image slot; "
            "pass the image separately (as the image argument or an image block)"
        )


def minigpt4_prompt_parts(variant: str, query: str, history=None, has_image: bool = True) -> list:
    """The prompt of one turn as a list of plain-text strings (user text and template text) and the slots
    ``BOS`` / ``EOS`` / ``IMAGE`` that only the template inserts. ``"".join(parts)`` is the prompt string."""
    if variant not in TEMPLATES:
        raise ValueError(f"unknown MiniGPT-4 variant {variant!r}; expected one of {sorted(TEMPLATES)}")
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    if not query.strip():
        raise ValueError("query is empty")
    _check_user_text(query, "the query")
    turns = check_history(history)
    for i, (q, a) in enumerate(turns):
        _check_user_text(q, f"history[{i}] (query)")
        _check_user_text(a, f"history[{i}] (answer)")
    system, user, assistant, sep = TEMPLATES[variant]
    parts = _template_parts(system + sep)
    for i, (q, a) in enumerate(turns + [(query, None)]):
        parts += _template_parts(user)
        if i == 0 and has_image:  # IMAGE_SEGMENT + " ", the image going where <ImageHere> is
            parts += ["<Img>", IMAGE, "</Img> "]
        parts.append(q)
        parts += _template_parts(sep)
        parts += _template_parts(assistant) if a is None else _template_parts(assistant) + [a] + _template_parts(sep)
    return [part for part in parts if part]


def build_minigpt4_prompt(variant: str, query: str, history=None, has_image: bool = True) -> str:
    """The conversation text of one turn. The image (if any) is the first user message, which ``ask()``
    extends with the first query after a space; ``history`` holds earlier (query, answer) pairs."""
    return "".join(minigpt4_prompt_parts(variant, query, history, has_image=has_image))


def minigpt4_chat_template(variant: str) -> str:
    """The Jinja chat template rendering ``bos_token`` + :func:`build_minigpt4_prompt` for ``variant``: BOS, system +
    sep, then per user message ``user role + text + sep`` (the first one starting with ``<Img><ImageHere></Img> ``
    when the conversation has an image), per assistant message ``assistant role + text + sep``, and the assistant role
    as the generation prompt. Content may be a string or a list of {"type": "text"|"image", ...} blocks.

    The leading BOS is the one every MiniGPT-4 prompt starts with (the original's tokenizer added it to the first
    segment). :class:`MiniGPT4Processor` drops it from a prompt string and adds the id itself; servers that tokenize
    the rendered template themselves with ``add_special_tokens=False`` (vLLM's chat endpoint) need it in the text."""
    if variant not in TEMPLATES:
        raise ValueError(f"unknown MiniGPT-4 variant {variant!r}; expected one of {sorted(TEMPLATES)}")
    system, user, assistant, sep = (jinja_string(part) for part in TEMPLATES[variant])
    return (
        JINJA_TEXT_OF
        + "{%- set ns = namespace(images=0) -%}"
        "{%- for message in messages -%}"
        + jinja_check_roles("MiniGPT-4")
        + JINJA_COUNT_IMAGES
        + "{%- if " + jinja_string(IMAGE_HERE) + " in text_of(message) -%}"
        "{{ raise_exception('message text contains the image marker " + IMAGE_HERE + "; pass the image as an image "
        "block') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if ns.images > 1 -%}"
        "{{ raise_exception('MiniGPT-4 takes at most one image per conversation') }}"
        "{%- endif -%}"
        "{{ bos_token }}{{ " + system + " }}{{ " + sep + " }}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ " + user + " }}"
        "{%- if loop.first and ns.images -%}{{ " + jinja_string(IMAGE_SEGMENT + " ") + " }}{%- endif -%}"
        "{{ text_of(message) }}{{ " + sep + " }}"
        "{%- else -%}{{ " + assistant + " }}{{ text_of(message) }}{{ " + sep + " }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + assistant + " }}{%- endif -%}"
    )


def legacy_encode(tokenizer, text: str) -> list[int]:
    """SentencePiece ids of ``text`` as the legacy slow ``LlamaTokenizer`` produced them (no BOS added):
    literal ``<s>`` / ``</s>`` are the special ids, and each stretch of text around them is one SentencePiece
    input with its own dummy-prefix ``▁``."""
    ids: list[int] = []
    specials = {"<s>": tokenizer.bos_token_id, "</s>": tokenizer.eos_token_id}
    rest = text
    while rest:
        hits = [(rest.find(tok), tok) for tok in specials if rest.find(tok) >= 0]
        if not hits:
            ids += tokenizer.encode(rest, add_special_tokens=False)
            break
        pos, tok = min(hits)
        if pos:
            ids += tokenizer.encode(rest[:pos], add_special_tokens=False)
        ids.append(specials[tok])
        rest = rest[pos + len(tok):]
    return ids


def build_minigpt4_inputs(tokenizer, variant: str, query: str, history=None, has_image: bool = True,
                          num_image_tokens: int = 32, image_token_id: int | None = None) -> list[int]:
    """Prompt ids: BOS + segment ids, with ``num_image_tokens`` × ``image_token_id`` where ``<ImageHere>`` was.
    Only the template's ``<s>`` becomes BOS; the user's text is encoded as text."""
    parts = minigpt4_prompt_parts(variant, query, history, has_image=has_image)
    return encode_minigpt4_parts(tokenizer, parts, num_image_tokens, image_token_id)


def encode_minigpt4_parts(tokenizer, parts: list, num_image_tokens: int = 32, image_token_id: int | None = None
                          ) -> list[int]:
    """BOS + the ids of ``parts`` (see :func:`minigpt4_prompt_parts`): each run of text between two slots is one
    SentencePiece input (own dummy-prefix "▁", special-token strings read as text), as the legacy tokenizer
    encoded each stretch between specials; ``BOS``/``EOS`` are the ids, ``IMAGE`` the placeholder run."""
    if image_token_id is None:
        image_token_id = tokenizer.image_token_id
    slot_ids = {BOS: [tokenizer.bos_token_id], EOS: [tokenizer.eos_token_id], IMAGE: [image_token_id] * num_image_tokens}
    ids = [tokenizer.bos_token_id]  # the original adds BOS to the first segment only
    text = ""
    for part in parts:
        if isinstance(part, _Slot):
            ids += encode_text(tokenizer, text) + slot_ids[part]
            text = ""
        else:
            text += part
    return ids + encode_text(tokenizer, text)


def parse_minigpt4_prompt(prompt: str, variant: str | None = None) -> list:
    """A formatted prompt string back as parts: every ``<ImageHere>`` is the image slot; ``<s>`` / ``</s>`` are
    BOS / EOS only inside the variant's own template strings (``<s>[INST] ``), text everywhere else. Without a
    variant every literal ``<s>`` / ``</s>`` is a slot, as the original's legacy tokenizer read them."""
    if variant is None:
        specials = ["<s>", "</s>"]
    elif variant not in TEMPLATES:
        raise ValueError(f"unknown MiniGPT-4 variant {variant!r}; expected one of {sorted(TEMPLATES)}")
    else:  # the template strings holding a literal <s> / </s>, longest first
        specials = sorted({p for p in TEMPLATES[variant] if "<s>" in p or "</s>" in p}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(p) for p in [IMAGE_HERE] + specials))
    parts: list = []
    last = 0
    for match in pattern.finditer(prompt):
        parts.append(prompt[last:match.start()])
        parts += [IMAGE] if match.group() == IMAGE_HERE else _template_parts(match.group())
        last = match.end()
    parts.append(prompt[last:])
    return [part for part in parts if part]


def encode_minigpt4_prompt(tokenizer, prompt: str, num_image_tokens: int = 32, image_token_id: int | None = None,
                           variant: str | None = None) -> list[int]:
    """Ids of a formatted prompt: BOS + the ids of each segment, ``num_image_tokens`` × ``image_token_id`` where
    each ``<ImageHere>`` was. With ``variant``, only that template's ``<s>`` is BOS (see
    :func:`parse_minigpt4_prompt`); without it, every literal ``<s>`` / ``</s>``, as :func:`legacy_encode`."""
    return encode_minigpt4_parts(tokenizer, parse_minigpt4_prompt(prompt, variant), num_image_tokens, image_token_id)


def process_response(text: str) -> str:
    """``Chat.answer``'s clean-up: cut at the first ``###``, keep what follows the last ``Assistant:``, strip."""
    text = text.split("###")[0]
    text = text.split("Assistant:")[-1]
    return text.strip()


class MiniGPT4Tokenizer(llama_tokenizer_class()):
    """transformers' ``LlamaTokenizer`` plus the model's ``image_token_id`` (saved in tokenizer_config.json).

    The image id is not a SentencePiece piece: it is the first id past them (an extra embedding row). When it is the
    next free id, ``<ImageHere>`` is registered as a special added token with that id, so that a whole formatted
    prompt encoded in one call maps the marker to the placeholder (``len(tokenizer)`` then counts it; ``vocab_size``
    stays the pieces). That is how servers which tokenize a rendered chat template themselves (vLLM) find the image
    slot. ``legacy=True`` by default, as MiniGPT-4's slow tokenizer: the text after a special token starts a new
    SentencePiece input with its own dummy-prefix ``▁``, so one call gives the ids of :func:`encode_minigpt4_prompt`.
    The builders here never rely on either: they encode each stretch of text separately."""

    def __init__(self, *args, image_token_id=None, **kwargs):
        kwargs.setdefault("legacy", True)
        super().__init__(*args, **kwargs)
        self.image_token_id = image_token_id
        self.init_kwargs["image_token_id"] = image_token_id
        if image_token_id is not None and image_token_id == len(self) and IMAGE_HERE not in self.get_vocab():
            self.add_tokens([AddedToken(IMAGE_HERE, special=True, normalized=False)], special_tokens=True)


# Arguments apply_chat_template / pipelines / vLLM pass to every processor that mean nothing here: the ids always start
# with BOS and then follow the legacy segment tokenization (a prompt's literal "<s>" included), rows are always
# left-padded, as in the original, and never truncated.
_IGNORED_KWARGS = ("add_special_tokens", "padding", "text_kwargs", "truncation")


def replacement_offsets(text: str, replacement: str) -> list[dict]:
    """Where each ``<ImageHere>`` of ``text`` is and what it becomes, in the form of transformers'
    ``ProcessorMixin.get_text_with_replacements`` (``type``, ``span``, ``new_span``, ``text``, ``replacement``);
    vLLM's Transformers backend reads it to expand the marker of a prompt it tokenized itself."""
    offsets, shift = [], 0
    for match in re.finditer(re.escape(IMAGE_HERE), text):
        start, end = match.span()
        offsets.append({"type": "image", "span": (start, end), "text": IMAGE_HERE, "replacement": replacement,
                        "new_span": (start + shift, start + shift + len(replacement))})
        shift += len(replacement) - (end - start)
    return offsets


@legacy_processor_attributes
class MiniGPT4Processor(ProcessorMixin):
    """Images + MiniGPT-4 prompts → ``input_ids``, ``attention_mask`` (left-padded) and ``pixel_values``.

    ``text`` is one or more formatted prompts (see :func:`build_minigpt4_prompt` or the chat template of
    ``variant``, whose leading BOS string is dropped: the ids always start with BOS) with ``<ImageHere>`` where an
    image goes; each marker becomes ``num_image_tokens`` × ``image_token_id``, and ``pixel_values`` (N, 3, S, S)
    holds the given images in the order of their markers.

    For vLLM's Transformers backend: ``image_token``, ``_get_num_multimodal_tokens`` and, with
    ``return_text_replacement_offsets=True``, ``text_replacement_offsets`` (what each marker expands to).
    """

    _auto_class = "AutoProcessor"
    # the image marker of a prompt string; the tokenizer holds it as the placeholder id (see MiniGPT4Tokenizer)
    image_token = IMAGE_HERE

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens: int = 32, variant: str = "vicuna0",
                 chat_template=None, **kwargs):
        self.num_image_tokens = int(num_image_tokens)
        self.variant = variant
        if chat_template is None:
            chat_template = minigpt4_chat_template(variant)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def build_prompt(self, query: str, history=None, has_image: bool = True) -> str:
        return build_minigpt4_prompt(self.variant, query, history, has_image=has_image)

    def __call__(self, images=None, text=None, videos=None, audio=None, return_tensors="pt", **kwargs) -> BatchFeature:
        if text is None:
            raise ValueError("MiniGPT4Processor needs text: prompt(s) from build_minigpt4_prompt, with <ImageHere>")
        if videos is not None or audio is not None:
            raise ValueError("MiniGPT-4 takes images only, no videos or audio")
        texts = prompt_list(text)
        flat_images = flatten_images(images)
        markers = [t.count(IMAGE_HERE) for t in texts]
        if sum(markers) != len(flat_images):
            raise ValueError(
                f"{sum(markers)} {IMAGE_HERE!r} marker(s) in the text (per prompt: {markers}) but "
                f"{len(flat_images)} image(s) given; each image needs exactly one marker"
            )
        return_offsets = kwargs.pop("return_text_replacement_offsets", False)
        image_kwargs = image_kwargs_of(kwargs, _IGNORED_KWARGS, "MiniGPT4Processor")
        rows = [encode_minigpt4_prompt(self.tokenizer, self._without_bos(t), self.num_image_tokens,
                                       variant=self.variant) for t in texts]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.unk_token_id
        data = left_pad(rows, pad)
        if flat_images:
            pixel_values = self.image_processor(flat_images, return_tensors="pt", **image_kwargs)["pixel_values"]
            data["pixel_values"] = pixel_values
        features = BatchFeature(data, tensor_type=return_tensors)
        if return_offsets:  # lists of dicts: set after the tensor conversion
            features["text_replacement_offsets"] = [
                replacement_offsets(t, IMAGE_HERE * self.num_image_tokens) for t in texts
            ]
        return features

    def _without_bos(self, text: str) -> str:
        """A prompt without the leading BOS string the chat template writes: the ids start with BOS anyway. The
        LLaMA-2 / MiniGPT-v2 prompts themselves start with the template's own ``<s>`` (the original's second BOS):
        there only a doubled leading BOS loses one."""
        bos = self.tokenizer.bos_token
        if not bos or not text.startswith(bos):
            return text
        rest = text[len(bos):]
        own_bos = self.variant is not None and build_minigpt4_prompt(self.variant, "?", [], has_image=False).startswith(bos)
        return rest if not own_bos or rest.startswith(bos) else text

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> dict:
        """Placeholders per image (``num_image_tokens`` whatever its size) and rows of ``pixel_values`` per image
        (one): what vLLM's Transformers backend asks before it processes any image."""
        count = len(image_sizes or ())
        return {"num_image_tokens": [self.num_image_tokens] * count, "num_image_patches": [1] * count}

    def decode(self, token_ids, **kwargs) -> str:
        kwargs.setdefault("skip_special_tokens", True)
        return process_response(self.tokenizer.decode(token_ids, **kwargs))

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = [
    "MiniGPT4Processor",
    "MiniGPT4Tokenizer",
    "encode_minigpt4_prompt",
    "encode_minigpt4_parts",
    "encode_text",
    "minigpt4_prompt_parts",
    "parse_minigpt4_prompt",
    "build_minigpt4_prompt",
    "build_minigpt4_inputs",
    "minigpt4_chat_template",
    "legacy_encode",
    "process_response",
    "replacement_offsets",
    "TEMPLATES",
    "STOP_STRINGS",
]
