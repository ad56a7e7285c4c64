"""A :class:`~.data.Sample` → ``input_ids`` + ``labels``, masked exactly as each family's original masks them.

The prompt is built by the family's own builder in the runtime package (the one ``chat`` uses), so a fine-tuned
model is asked at inference exactly as it was taught. Image placeholders are always part of the prompt, which is
never supervised; ``labels`` is −100 wherever nothing is learnt.

- **VisualGLM** (VisualGLM-6B ``finetune_visualglm.py`` ``FewShotDataset``, spec visualglm.md §3 "Fine-tune
  sample"): ``ids = prompt … [gMASK] <sop> + answer + <eop>``; ``labels`` = −100 before ``<sop>``, the ids from
  ``<sop>`` on (``labels = [-100] * context_length + input_ids[mask_position + 1:]``, ``context_length`` = the
  index of ``<sop>``). The answer is encoded on its own (``tokenizer.encode(label)``) and cut to
  ``max_target_length - 2`` tokens (256 in ``finetune/*.sh``).
- **CogVLM / CogVLM2** (HF ``build_conversation_input_ids(..., answer=)`` of ``cogvlm2-llama3-chat-19B``, used by
  CogVLM2 ``finetune_demo/peft_lora.py``; spec cogvlm.md §2.4/§5): ``ids = [bos] + image + encode(prompt) +
  encode(answer) + [eos]``, ``labels`` = −100 on everything before the answer, then ``answer + eos``.
- **MiniGPT-4** (``MiniGPT4.forward``, spec minigpt4.md §1.7): ``[bos] + wrapped prompt`` unsupervised (``empty_targets``
  covers bos and the image-wrapped prompt), then the answer and its end supervised. Two prompts:

  - cc_sbu_align samples (``template="minigpt4-stage2"``) follow the original stage-2 recipe exactly: its
    ``prompt_template`` (``###Human: {} ###Assistant: `` / ``[INST] {} [/INST] ``, no system prompt) and
    ``encode(answer + end_sym)`` (Vicuna v0 ``###``, LLaMA-2 ``</s>`` = eos). That prompt is not ``chat``'s (no
    system prompt): it is the original's way of teaching the projection, kept for its data.
  - every other format uses ``chat``'s prompt, id for id (system prompt, history, ``###Assistant: `` whose space is
    a lone ``▁`` before the answer's own dummy-prefix ``▁``, as the legacy tokenizer encoded each segment), and
    the answer ends the way generation stops: Vicuna v0 ``answer + "###"`` (``chat``'s stop string) ``+ </s>`` (a
    plain ``generate()``'s eos; the shipped tiny models were trained with this ending, ``tools/train_tiny.py``),
    LLaMA-2 / MiniGPT-v2 ``answer + </s>``.

  ``max_txt_len`` 160 cuts answer + end.

VisualGLM and CogVLM have one prompt: ``chat``'s, and their answers end with the id ``chat`` stops at (``<eop>``,
eos), as the originals' fine-tune scripts and ``tools/train_tiny.py`` do. ``tests/test_finetune_encode.py`` checks
the prompt ids against the model's own ``_chat_inputs`` on the shipped tiny models.
"""

from __future__ import annotations

from dataclasses import dataclass

from .data import DataError, Sample

IGNORE = -100

# the originals' answer length caps (answer + end token): VisualGLM finetune/*.sh --max_target_length 256 (the
# answer keeps 254 after <sop> and <eop>), CogVLM2 peft_lora.py max_output_len 128, MiniGPT-4 max_txt_len 160
MAX_TARGET_LENGTH = {"visualglm": 256, "cogvlm": 128, "minigpt4": 160}

# MiniGPT-4 stage 2 prompt_template per variant (train_configs/minigpt4{,_llama2}_stage2_finetune.yaml)
STAGE2_TEMPLATES = {"vicuna0": "###Human: {} ###Assistant: ", "llama2": "[INST] {} [/INST] ",
                    "minigptv2": "[INST] {} [/INST] "}


@dataclass
class Encoded:
    """``input_ids`` = the prompt (its first ``prompt_length`` ids, image slots included) + the answer and its end."""

    input_ids: list[int]
    labels: list[int]
    image: str | None
    source: str = ""
    prompt_length: int = 0

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def family_of(config) -> str:
    """``visualglm`` | ``cogvlm`` (v1 and v2) | ``minigpt4`` from ``config.model_type``."""
    kind = getattr(config, "model_type", None)
    if kind not in MAX_TARGET_LENGTH:
        raise ValueError(f"not a VisualGLM / CogVLM / MiniGPT-4 folder (config model_type {kind!r})")
    return kind


class SampleEncoder:
    """Turns samples into ids + labels for one model folder (its tokenizer and config).

    ``english``: VisualGLM's prompt language (None: English iff the query has no CJK ideograph, as ``chat``;
    the original fine-tune script always used 问：/答：, i.e. ``english=False``). ``template``: CogVLM's prompt template
    (default: the folder's ``template_version``, the one ``chat`` uses)."""

    def __init__(self, tokenizer, config, *, english: bool | None = None, max_target_length: int | None = None,
                 template: str | None = None):
        self.tokenizer = tokenizer
        self.config = config
        self.family = family_of(config)
        self.english = english
        self.max_target_length = max_target_length or MAX_TARGET_LENGTH[self.family]
        if self.max_target_length < 3:
            raise ValueError("max_target_length must be at least 3")
        self.template = template or getattr(config, "template_version", None)
        self._encode = {"visualglm": self._visualglm, "cogvlm": self._cogvlm, "minigpt4": self._minigpt4}[self.family]

    def __call__(self, sample: Sample) -> Encoded:
        try:
            prompt, answer = self._encode(sample)
        except (ValueError, TypeError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{sample.source or 'sample'}: {e}") from None
        image_id = self.config.image_token_id
        # the rule every family shares: the prompt (image slots included) is never supervised
        ids = prompt + answer
        labels = [IGNORE] * len(prompt) + answer
        if self.family == "visualglm":  # the original supervises from <sop> (the prompt's last id) on
            labels[len(prompt) - 1] = prompt[-1]
        assert all(label == IGNORE for i, label in zip(ids, labels) if i == image_id)
        return Encoded(ids, labels, sample.image, sample.source, prompt_length=len(prompt))

    # --- families ------------------------------------------------------------------------------------------
    def _visualglm(self, sample: Sample):
        from modeling_visualglm.processing_visualglm import build_visualglm_inputs, encode_text

        tok = self.tokenizer
        prompt = build_visualglm_inputs(tok, sample.query, history=list(sample.history),
                                        has_image=sample.image is not None,
                                        num_image_tokens=self.config.num_image_tokens, english=self.english)
        if prompt[-2:] != [tok.gmask_token_id, tok.sop_token_id]:
            raise ValueError("the VisualGLM prompt does not end in [gMASK] <sop>")
        answer = encode_text(tok, sample.answer)[: self.max_target_length - 2]
        return prompt, answer + [tok.eop_token_id]

    def _cogvlm(self, sample: Sample):
        from modeling_visualglm.processing_cogvlm import build_cogvlm_inputs, build_cogvlm_prompt, encode_text

        tok = self.tokenizer
        text = build_cogvlm_prompt(sample.query, list(sample.history), template=self.template)
        prompt = build_cogvlm_inputs(tok, text, sample.image is not None, self.config.num_image_tokens,
                                     self.config.image_token_id)
        eos = tok.eos_token_id if tok.eos_token_id is not None else self.config.text_config.eos_token_id
        answer = encode_text(tok, sample.answer)[: self.max_target_length - 1]
        return prompt, answer + [eos]

    def _minigpt4(self, sample: Sample):
        from modeling_visualglm.processing_minigpt4 import (IMAGE, build_minigpt4_inputs, encode_minigpt4_parts,
                                                            encode_text)

        tok, cfg = self.tokenizer, self.config
        variant = cfg.variant
        if sample.template == "minigpt4-stage2":
            if sample.history:
                raise ValueError("the stage-2 template is single-turn")
            before, after = STAGE2_TEMPLATES[variant].split("{}")
            if sample.image is not None:  # "<Img><ImageHere></Img> {instruction}" inside the template
                parts = [before + "<Img>", IMAGE, "</Img> " + sample.query + after]
            else:
                parts = [before + sample.query + after]
            prompt = encode_minigpt4_parts(tok, parts, cfg.num_image_tokens, cfg.image_token_id)
        else:
            prompt = build_minigpt4_inputs(tok, variant, sample.query, history=list(sample.history),
                                           has_image=sample.image is not None,
                                           num_image_tokens=cfg.num_image_tokens, image_token_id=cfg.image_token_id)
        if variant == "vicuna0" and sample.template == "minigpt4-stage2":
            # the original stage 2: end_sym "###", tokenized together with the answer (text + end_sym), no eos
            return prompt, encode_text(tok, sample.answer + "###")[: self.max_target_length]
        # chat format: the answer ends as `chat` stops it (the "###" stop string for Vicuna v0) and then with eos,
        # which a plain generate() stops at; the shipped tiny models learnt this ending (tools/train_tiny.py).
        # LLaMA-2 / MiniGPT-v2: end_sym "</s>", which the legacy tokenizer read as eos.
        text = sample.answer + "###" if variant == "vicuna0" else sample.answer
        return prompt, encode_text(tok, text)[: self.max_target_length - 1] + [tok.eos_token_id]
