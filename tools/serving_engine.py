"""Dynamic micro-batching for ``visualglm-serve``: concurrent chat turns share one ragged ``generate`` call.

Each request becomes a :class:`Job` with the prompt ids, pixel values and ``generate`` keywords that the model's own
``chat`` would use (``model._chat_inputs``: the family's prompt template, ``CHAT_DEFAULTS`` under the request's
overrides, its logits processors, stop strings and history fitting). One worker thread owns the model. It takes the
oldest waiting job, collects for ``batch_window_s`` more jobs with the same sampling settings (up to
``max_batch_size``), left-pads their prompts (rows without a picture have no placeholders; ``pixel_values`` holds
the pictures in row order, as the processors build batches), and runs one ``generate``. A streamer hands every
step's tokens to the rows; a stopping criterion ends each row on its own ``max_tokens``, its stop strings or its
client's disconnect, so a finished or abandoned row never holds the batch longer than the others need.

Why not continuous batching: transformers' continuous-batching manager (``generate_batch``, ``transformers serve
--continuous-batching``) schedules text-only prompts through paged attention; it has no way to pass
``pixel_values`` or our image placeholders (docs/serving.md). Requests that arrive while a batch runs wait for the
next one.

Overload never hangs: at most ``max_queue`` jobs wait (``QueueFull`` → HTTP 429), and a job that waited longer
than ``queue_timeout_s`` is refused (HTTP 503); both carry ``Retry-After``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers.generation import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer


class QueueFull(RuntimeError):
    """The bounded queue is full (HTTP 429)."""


class EngineClosed(RuntimeError):
    """The engine is shutting down or its worker died (HTTP 503)."""


_ids = itertools.count(1)


@dataclass
class Job:
    input_ids: list[int]
    pixel_values: torch.Tensor | None
    generate_kwargs: dict  # without max_new_tokens / streamer / stopping_criteria
    max_new_tokens: int
    emit: Callable[[str, object], None]  # ("delta", str) / ("done", dict) / ("error", (status, message))
    id: int = field(default_factory=lambda: next(_ids))
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    done: bool = False
    finish_reason: str | None = None
    started_at: float | None = None

    @property
    def group_key(self) -> tuple:
        """Jobs that may share a ``generate``: same sampling settings (logits processors are the family's)."""
        return tuple(sorted((k, repr(v)) for k, v in self.generate_kwargs.items()
                            if k not in ("logits_processor", "tokenizer")))

    def cancel(self) -> None:
        """The client went away: drop the job if it waits, end its row if it runs."""
        self.cancelled = True


class _Rows(BaseStreamer):
    """Per-step tokens of a batch → each row's text; marks rows done (eos, stop string, length, cancelled)."""

    def __init__(self, engine: "Engine", jobs: list[Job], kwargs: dict):
        self.engine = engine
        self.jobs = jobs
        self.prompt_seen = False
        eos = kwargs.get("eos_token_id")
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.stops = list(kwargs.get("stop_strings") or [])
        # characters held back from the stream until the row ends: a clean-up that rewrites the tail (a stop
        # string being cut, full-width punctuation before an ideograph) must not change text already sent
        self.hold = max([1] + [len(s) for s in self.stops])

    def put(self, value):
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for job, token in zip(self.jobs, value.reshape(-1).tolist()):
            if job.done:
                continue
            if job.cancelled:
                self.engine._finish(job, "cancelled")
                continue
            if token in self.eos:
                self.engine._finish(job, "stop")
                continue
            job.tokens.append(token)
            raw = self.engine.decode_raw(job.tokens)
            if self.stops and any(s in raw for s in self.stops):
                self.engine._finish(job, "stop", self.stops)
            elif len(job.tokens) >= job.max_new_tokens:
                self.engine._finish(job, "length")
            elif token not in self.engine.byte_tokens:
                # a run of byte-fallback pieces decodes as a whole (an invalid run turns every byte into U+FFFD):
                # its text is final only once a non-byte piece follows
                self.engine._stream(job, self.engine.response(raw), self.hold)


    def end(self):
        pass


class _RowsDone(StoppingCriteria):
    """Per-row stop for ``generate``: a row is finished once the streamer marked it done."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor([job.done or job.cancelled for job in self.jobs], dtype=torch.bool,
                            device=input_ids.device)


def byte_fallback_ids(tokenizer) -> frozenset[int]:
    """Ids of SentencePiece byte-fallback pieces (``<0x0A>``)."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return frozenset()
    return frozenset(i for piece, i in vocab.items() if len(piece) == 6 and piece.startswith("<0x") and piece[5] == ">")


class Engine:
    """One model, one worker thread, a bounded queue of :class:`Job`."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, batch_window_s: float = 0.01,
                 max_queue: int = 64, queue_timeout_s: float = 60.0):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_window_s = float(batch_window_s)
        self.max_queue = int(max_queue)
        self.queue_timeout_s = float(queue_timeout_s)
        self.byte_tokens = byte_fallback_ids(tokenizer)
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.running: list[Job] = []
        self.stats = dict(batches=0, rows=0, max_rows=0, refused_full=0, refused_timeout=0, cancelled=0)
        self._worker = threading.Thread(target=self._loop, name="visualglm-serve-engine", daemon=True)
        self._worker.start()

    # --- requests -------------------------------------------------------------------------------------------
    def prepare(self, image, query: str, history: list, overrides: dict, emit) -> Job:
        """A job for one chat turn, built exactly as ``model.chat`` builds its ``generate`` call (raises
        ``ValueError``/``TypeError`` for a query or history the model refuses)."""
        input_ids, pixel_values, kwargs = self.model._chat_inputs(self.tokenizer, image, query, history, overrides)
        max_new = int(kwargs.pop("max_new_tokens"))
        return Job(input_ids[0].tolist(), pixel_values, kwargs, max_new, emit)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed or not self._worker.is_alive():
                raise EngineClosed("the engine is not running")
            waiting = sum(not j.cancelled for j in self._queue)
            if waiting >= self.max_queue:
                self.stats["refused_full"] += 1
                raise QueueFull(f"{waiting} requests are waiting (the queue holds {self.max_queue})")
            self._queue.append(job)
            self._cond.notify()

    def queued(self) -> int:
        with self._cond:
            return sum(not j.cancelled for j in self._queue)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            job.emit("error", (503, "the server is shutting down"))

    # --- text -----------------------------------------------------------------------------------------------
    def decode_raw(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def response(self, raw: str) -> str:
        return self.model._chat_response(raw)

    def _stream(self, job: Job, text: str, hold: int) -> None:
        if text.endswith("\ufffd"):  # half of a multi-byte character
            return
        ready = text[: max(0, len(text) - hold)]
        if len(ready) > len(job.sent) and ready.startswith(job.sent):
            delta, job.sent = ready[len(job.sent):], ready
            job.emit("delta", delta)

    def _finish(self, job: Job, reason: str, stops=()) -> None:
        job.done = True
        job.finish_reason = reason
        if reason == "cancelled":
            self.stats["cancelled"] += 1
            return
        raw = self.decode_raw(job.tokens)
        for stop in stops:  # the answer ends before its stop string (OpenAI's `stop`, MiniGPT-4's ###)
            raw = raw.split(stop)[0]
        text = self.response(raw)
        if text.startswith(job.sent) and len(text) > len(job.sent):
            job.emit("delta", text[len(job.sent):])
        job.emit("done", dict(text=text, finish_reason=reason, prompt_tokens=len(job.input_ids),
                              completion_tokens=len(job.tokens)))

    # --- the worker -----------------------------------------------------------------------------------------
    def _take_batch(self) -> list[Job]:
        with self._cond:
            while not self._closed:
                while self._queue and self._queue[0].cancelled:
                    self._queue.popleft()
                    self.stats["cancelled"] += 1
                if self._queue:
                    break
                self._cond.wait()
            if self._closed:
                return []
            first = self._queue[0]
            deadline = time.monotonic() + self.batch_window_s
            while len(self._queue) < self.max_batch_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            key = first.group_key
            batch, rest = [], deque()
            for job in self._queue:
                if job.cancelled:
                    self.stats["cancelled"] += 1
                elif len(batch) < self.max_batch_size and job.group_key == key:
                    batch.append(job)
                else:
                    rest.append(job)
            self._queue = rest
        now = time.monotonic()
        ready = []
        for job in batch:
            if now - job.enqueued_at > self.queue_timeout_s:
                self.stats["refused_timeout"] += 1
                job.emit("error", (503, f"waited more than {self.queue_timeout_s:g}s for a free slot"))
            else:
                job.started_at = now
                ready.append(job)
        return ready

    def _loop(self) -> None:
        while True:
            jobs = self._take_batch()
            if not jobs:
                with self._cond:
                    if self._closed:
                        return
                continue
            self.running = jobs
            try:
                self._generate(jobs)
            except Exception as err:  # one failed batch answers its rows with 500; the engine goes on
                for job in jobs:
                    if not job.done:
                        job.done = True
                        job.emit("error", (500, f"generation failed: {type(err).__name__}: {err}"))
            finally:
                self.running = []

    @torch.no_grad()
    def _generate(self, jobs: list[Job]) -> None:
        model = self.model
        kwargs = dict(jobs[0].generate_kwargs)
        pad = kwargs.get("pad_token_id")
        pad = 0 if pad is None else int(pad)
        width = max(len(j.input_ids) for j in jobs)
        input_ids = torch.tensor([[pad] * (width - len(j.input_ids)) + j.input_ids for j in jobs], dtype=torch.long)
        attention_mask = torch.tensor([[0] * (width - len(j.input_ids)) + [1] * len(j.input_ids) for j in jobs],
                                      dtype=torch.long)
        pictures = [j.pixel_values for j in jobs if j.pixel_values is not None]
        pixel_values = torch.cat(pictures, 0) if pictures else None
        self.stats["batches"] += 1
        self.stats["rows"] += len(jobs)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(jobs))
        streamer = _Rows(self, jobs, kwargs)
        criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        criteria.append(_RowsDone(jobs))
        model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                       pixel_values=pixel_values, max_new_tokens=max(j.max_new_tokens for j in jobs),
                       streamer=streamer, stopping_criteria=criteria, **kwargs)
        for job in jobs:  # rows generate() ended on its own (its max_length, a stop string it saw first)
            if not job.done:
                self._finish(job, "cancelled" if job.cancelled else "length")
