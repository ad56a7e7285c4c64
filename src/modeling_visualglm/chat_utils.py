"""Chat helpers shared by every family: history checks, logits guards, streaming ``generate``, and the text and
batching steps the processors share (user text encoded as text, prompt lists, left padding, keyword checks).

``stream_generate`` runs ``model.generate`` in a worker thread with a streamer that hands each step's new
token ids to the caller, which decodes the growing answer (the ``stream_chat`` API of THUDM's ChatGLM
code, built on transformers' streamer hook instead of a hand-written sampling loop).
"""

from __future__ import annotations

import threading
import warnings
from queue import Queue
from typing import Callable, Iterator

import torch
from transformers.generation import LogitsProcessor
from transformers.generation.streamers import BaseStreamer


def check_history(history) -> list[tuple[str, str]]:
    """``None`` → ``[]``; otherwise a list of ``(query, response)`` string pairs, else an error naming the turn."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise TypeError(f"history must be a list of (query, response) pairs, got {type(history).__name__}")
    turns = []
    for i, turn in enumerate(history):
        if isinstance(turn, str) or not isinstance(turn, (list, tuple)) or len(turn) != 2:
            raise ValueError(f"history[{i}] must be a (query, response) pair, got {turn!r}")
        if not all(isinstance(part, str) for part in turn):
            raise TypeError(f"history[{i}] must hold two strings, got {tuple(type(p).__name__ for p in turn)}")
        turns.append((turn[0], turn[1]))
    return turns


def chat_generate_kwargs(defaults: dict, gen_kwargs: dict) -> dict:
    """The ``generate`` kwargs of one chat turn: a family's ``CHAT_DEFAULTS`` under the caller's overrides.

    In ``chat``, ``max_length`` counts new tokens only (it becomes ``max_new_tokens``; an explicit
    ``max_new_tokens`` wins), so a long history never leaves the answer without room. Without sampling, the
    table's sampling knobs are set to None so they neither apply nor warn.
    """
    user = dict(gen_kwargs)
    if "max_length" in user:
        max_length = user.pop("max_length")
        user.setdefault("max_new_tokens", max_length)
    kwargs = {**defaults, **user}
    if not kwargs.get("do_sample", False):
        for key in ("top_p", "top_k", "temperature"):
            if key in defaults and key not in user:
                kwargs[key] = None
    return kwargs


def fit_chat_prompt(build: Callable[[list], list], history: list, max_positions: int, max_new_tokens: int,
                    saved_positions: int = 0) -> list:
    """Prompt ids for ``history`` + the query, with room for the answer.

    ``build(turns)`` returns the prompt ids for a list of history turns; the prompt takes ``len(ids) -
    saved_positions`` positions (CogVLM's image block takes 3 positions for all its tokens). While the prompt leaves fewer than
    ``min(max_new_tokens, max_positions // 4)`` of the model's ``max_positions`` for the answer, the oldest turn is
    dropped from the prompt (the caller's history is not changed), with a warning. A query that does not fit even
    without history raises ``ValueError``.
    """
    reserve = max(1, min(max_new_tokens, max_positions // 4))
    max_positions += saved_positions  # in tokens from here on
    turns = list(history)
    ids = build(turns)
    while turns and len(ids) + reserve > max_positions:
        turns = turns[1:]
        ids = build(turns)
    if len(turns) < len(history):
        warnings.warn(
            f"chat: the oldest {len(history) - len(turns)} of {len(history)} history turn(s) were left out of the "
            f"prompt so that it fits the model's {max_positions - saved_positions} positions with room for the answer",
            UserWarning,
            stacklevel=5,  # the caller of chat() / the loop over stream_chat()
        )
    if len(ids) >= max_positions:
        raise ValueError(
            f"the query needs {len(ids) - saved_positions} positions with its template (and image), but the model "
            f"has only {max_positions - saved_positions}: shorten the query"
        )
    return ids


def prepare_chat(build: Callable[[list], list], history: list, defaults: dict, gen_kwargs: dict,
                 max_positions: int, saved_positions: int = 0) -> tuple[list, dict]:
    """(prompt ids, generate kwargs) of one chat turn; the answer never runs past ``max_positions``."""
    kwargs = chat_generate_kwargs(defaults, gen_kwargs)
    budget = kwargs.get("max_new_tokens") or max_positions
    ids = fit_chat_prompt(build, history, max_positions, budget, saved_positions)
    kwargs["max_new_tokens"] = min(budget, max_positions + saved_positions - len(ids))
    return ids, kwargs


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """Guards fp16 overflow: a row whose scores hold NaN or +inf gets all its mass on ``eos_token_id``.

    Branch-free (``torch.where``), so it adds no host sync to the decode step. ``-inf`` is legitimate
    (``min_length``, top-k) and is left alone.
    """

    def __init__(self, eos_token_id: int):
        self.eos_token_id = int(eos_token_id)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        bad = (torch.isnan(scores) | (scores == float("inf"))).any(dim=-1, keepdim=True)  # (B, 1)
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.eos_token_id] = 0.0
        return torch.where(bad, forced, scores)


class TokenRangeLogitsProcessor(LogitsProcessor):
    """Never sample ids the tokenizer cannot decode (embedding tables are often padded past the
    tokenizer, e.g. ChatGLM-6B's 130528 rows for 130344 pieces; image placeholder ids live there too)."""

    def __init__(self, num_decodable: int):
        self.num_decodable = int(num_decodable)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[-1] <= self.num_decodable:
            return scores
        return scores.index_fill(-1, torch.arange(self.num_decodable, scores.shape[-1], device=scores.device),
                                 -float("inf"))


class TokenQueueStreamer(BaseStreamer):
    """Hands each step's new token ids of a batch-1 ``generate`` to a consumer thread."""

    _END = object()

    def __init__(self):
        self.queue: Queue = Queue()
        self.skip = True  # generate() first puts the prompt
        self.ended = False

    def put(self, value):
        if self.skip:
            self.skip = False
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self):
        if not self.ended:
            self.ended = True
            self.queue.put(self._END)

    def __iter__(self):
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            yield item


def stream_generate(model, decode: Callable[[list], str], **generate_kwargs) -> Iterator[str]:
    """Yield ``decode(all new tokens so far)`` after every step of ``model.generate(**generate_kwargs)``
    (batch 1). Exceptions raised by ``generate`` in the worker thread are re-raised here."""
    streamer = TokenQueueStreamer()
    errors: list = []

    def run():
        try:
            model.generate(streamer=streamer, **generate_kwargs)
        except BaseException as exc:  # re-raised in the consumer thread
            errors.append(exc)
        finally:
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    tokens: list[int] = []
    for new_tokens in streamer:
        tokens.extend(new_tokens)
        yield decode(tokens)
    thread.join()
    if errors:
        raise errors[0]


# --- processors ------------------------------------------------------------------------------------------------
def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` with every special-token string in it read as plain text (no bos/eos added)."""
    if not text:
        return []
    ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    # a tokenizer whose model still merges text into a control token would break the guarantee: refuse it
    specials = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    leaked = sorted({i for i in ids if i in specials})
    if leaked:
        raise ValueError(f"the tokenizer encoded text to special id(s) {leaked}; it cannot keep user text as text")
    return ids


def prompt_list(text) -> list[str]:
    """A processor's ``text`` (one prompt or a list) as a non-empty list of strings."""
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("text must be a string or a non-empty list of strings")
    return texts


def left_pad(rows: list[list[int]], pad_token_id: int) -> dict:
    """Rows of ids → ``input_ids`` left-padded with ``pad_token_id`` to the longest row, and ``attention_mask``."""
    width = max(len(r) for r in rows)
    return {
        "input_ids": [[pad_token_id] * (width - len(r)) + r for r in rows],
        "attention_mask": [[0] * (width - len(r)) + [1] * len(r) for r in rows],
    }


def image_kwargs_of(kwargs: dict, ignored: tuple, processor: str) -> dict:
    """The image processor's keyword arguments among a processor call's ``kwargs`` (``images_kwargs``, ``size``);
    ``ignored`` ones are dropped, anything else raises."""
    image_kwargs = dict(kwargs.pop("images_kwargs", None) or {})
    if "size" in kwargs:
        image_kwargs["size"] = kwargs.pop("size")
    unknown = sorted(k for k in kwargs if k not in ignored)
    if unknown:
        raise TypeError(f"unexpected arguments {unknown}; {processor} takes images, text, return_tensors, size "
                        "(a pipeline passes its unknown keywords here: give generate() options as generate_kwargs=)")
    return image_kwargs


# --- chat templates (Jinja) ------------------------------------------------------------------------------------
def jinja_string(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# The text of a message: a string, or the "text" blocks of a list of {"type": "text"|"image", ...} blocks.
JINJA_TEXT_OF = (
    "{%- macro text_of(message) -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'text' -%}{{ block['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

# Inside a loop over the messages: add the message's image blocks to ns.images.
JINJA_COUNT_IMAGES = (
    "{%- if message['content'] is not string -%}{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)


def jinja_check_roles(model_name: str) -> str:
    """Jinja for inside a loop over the messages: only user and assistant messages, alternating from user."""
    return (
        "{%- if message['role'] not in ['user', 'assistant'] -%}"
        "{{ raise_exception('" + model_name
        + " knows only user and assistant messages, got role ' + message['role']) }}"
        "{%- endif -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('messages must alternate user/assistant, starting with user') }}"
        "{%- endif -%}"
    )
