"""``visualglm-chat``: a streaming terminal chat with a modeling_visualglm hub folder (every family).

    visualglm-chat --model DIR [--image PATH_OR_URL] [--device cpu|cuda] [--dtype ...] [sampling flags]

At the ``>>>`` prompt: a question (a line ending in ``\\`` continues on the next line; a line ``\"\"\"`` opens and
closes a multi-line block), ``/image PATH_OR_URL`` (a new picture, a new conversation; ``/image`` alone: none),
``/clear`` (forget the conversation), ``/history``, ``/help``, ``/exit`` or Ctrl-D. Ctrl-C while an answer streams
stops that answer (what came so far stays in the history); Ctrl-C at the prompt drops the line.

The answer streams through ``model.stream_chat`` with the family's chat defaults (``CHAT_DEFAULTS``) under the
sampling flags; VisualGLM-6B's ``cli_demo.py``, CogVLM's ``basic_demo/cli_demo_hf.py`` and MiniGPT-4's demo are the
originals this replaces.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings

import torch
from transformers.generation import StoppingCriteria, StoppingCriteriaList

from .serving import (ImageError, add_model_arguments, add_sampling_arguments, describe_sampling, load_image_source,
                      load_model, sampling_overrides)

HELP = """commands:
  /image PATH_OR_URL   use a new picture (starts a new conversation); /image alone: no picture
  /clear               forget the conversation (keeps the picture)
  /history             show the conversation
  /exit                quit (or Ctrl-D)
  a line ending in \\ continues on the next line; a line \"\"\" opens and closes a multi-line block
  Ctrl-C stops the answer being written"""


class StopFlag(StoppingCriteria):
    """Ends ``generate`` at the next step once ``event`` is set (Ctrl-C)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def read_question(prompt: str = ">>> ", more: str = "... ") -> str | None:
    """One question from stdin (None at EOF); backslash continuations and \"\"\" blocks make several lines."""
    line = input(prompt)
    if line.strip() == '"""':
        lines = []
        while True:
            line = input(more)
            if line.strip() == '"""':
                return "\n".join(lines)
            lines.append(line)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input(more)
    lines.append(line)
    return "\n".join(lines)


class Session:
    def __init__(self, model, tokenizer, overrides: dict, out=sys.stdout):
        self.model, self.tokenizer, self.overrides, self.out = model, tokenizer, overrides, out
        self.image = None
        self.image_name = None
        self.history: list[tuple[str, str]] = []
        self.stop = threading.Event()

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def set_image(self, source: str | None) -> None:
        if not source:
            self.image, self.image_name = None, None
            self.history = []
            self.say("[no picture; new conversation]")
            return
        try:
            self.image = load_image_source(self.model, source, allow_local_files=True)
        except ImageError as err:
            self.say(f"[cannot use that picture: {err}]")
            return
        self.image_name = source
        self.history = []
        self.say(f"[picture: {source} ({self.image.width}x{self.image.height}); new conversation]")

    def answer(self, query: str) -> None:
        """Stream one answer; Ctrl-C (SIGINT) sets the stop flag instead of raising, so generate ends cleanly."""
        self.stop.clear()
        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        shown = ""
        response, history = "", self.history + [(query, "")]
        caught = warnings.catch_warnings(record=True)  # generate's notes go after the answer, not inside it
        notes = caught.__enter__()
        warnings.simplefilter("default")
        try:
            kwargs = dict(self.overrides, stopping_criteria=StoppingCriteriaList([StopFlag(self.stop)]))
            for response, history in self.model.stream_chat(self.tokenizer, self.image, query, self.history,
                                                            **kwargs):
                if response.startswith(shown):
                    self.out.write(response[len(shown):])
                else:  # the clean-up rewrote the tail: start the line over
                    self.out.write("\r\033[K" + response)
                self.out.flush()
                shown = response
        except (ValueError, TypeError) as err:  # the model's checks on the query (too long, bad history)
            self.say(f"\n[error: {err}]")
            return
        finally:
            signal.signal(signal.SIGINT, previous)
            caught.__exit__(None, None, None)
        if self.stop.is_set():
            self.say("\n[stopped]")
        else:
            self.say()
        for note in notes:
            self.say(f"[warning: {note.message}]")
        self.history = history

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, arg = line.strip().partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/image":
            self.set_image(arg.strip() or None)
        elif name == "/clear":
            self.history = []
            self.say("[conversation cleared]")
        elif name == "/history":
            if not self.history:
                self.say("[no conversation yet]")
            for i, (q, a) in enumerate(self.history, 1):
                self.say(f"[{i}] you: {q}\n[{i}] model: {a}")
        elif name == "/help":
            self.say(HELP)
        else:
            self.say(f"[unknown command {name}; /help lists them]")
        return True

    def loop(self) -> None:
        while True:
            try:
                query = read_question()
            except EOFError:
                self.say()
                return
            except KeyboardInterrupt:  # at the prompt: drop the line
                self.say("^C")
                continue
            if not query.strip():
                continue
            if query.startswith("/"):
                if not self.command(query):
                    return
                continue
            self.answer(query)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="visualglm-chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--image", help="a picture to start with (path or http(s) URL)")
    add_sampling_arguments(ap)
    args = ap.parse_args(argv)
    overrides = sampling_overrides(args)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    session = Session(model, tokenizer, overrides)
    session.say(f"{type(model).__name__} from {args.model} on {model.device}")
    session.say(f"sampling: {describe_sampling(model, overrides)}")
    session.say("/help for commands, /exit to quit")
    if args.image:
        session.set_image(args.image)
    session.loop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
