"""What a user does with a hub folder, run under whatever transformers is installed (test helper script).

    python tests/compat_check.py FOLDER NAME RESULT.json

Runs in a fresh interpreter that has only torch, transformers, peft and PIL (the caller blocks
``modeling_visualglm``): the folder's remote code must be enough. NAME is one of tests/tiny_folders.FOLDERS.
Checks, each failing loudly:

- AutoConfig, AutoModel / AutoModelForCausalLM / AutoModelForImageTextToText (same weights; AutoModel may be the
  family's model without the LM head, MiniGPT-4's ``MiniGPT4Model``, whose last hidden state through the LM head
  gives the same logits), AutoTokenizer, AutoProcessor;
- a plain ``generate(**inputs)`` on the folder's neutral generation_config.json: no warning, and it stops at EOS
  or after ``max_new_tokens``;
- ``chat`` (greedy) and ``stream_chat`` (whose last answer is ``chat``'s), a two-turn chat with a long history;
- a ragged, left-padded batch mixing image and text-only rows == each row alone (greedy tokens);
- ``cache_implementation="static"`` == the dynamic cache (greedy tokens);
- ``save_pretrained`` + reload through AutoModelForCausalLM == the loaded model (logits);
- a peft LoRA training step with gradient checkpointing: finite loss, LoRA weights get gradients and move.

RESULT.json gets the transformers version, the greedy tokens and the first-step logits of a fixed prompt, so the
caller can compare releases with each other.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import warnings

import torch
import transformers
from PIL import Image
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                          AutoTokenizer)

LORA_TARGETS = {  # each family's original recipe (spec: fine-tuning): VisualGLM's ChatGLM qkv + dense only
    "visualglm": r"language_model\.layers\.\d+\.attention\.(query_key_value|dense)",
    "cogvlm": ["vision_expert_query_key_value"],
    "cogvlm2": ["vision_expert_query_key_value"],
    "minigpt4": ["llama_proj"],
}


def image(seed: int, size: int = 64) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())


class LoggedWarnings(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def single_inputs(model, tokenizer, query, img):
    """(input_ids (1, T), pixel_values or None) of one chat turn, built by the folder's own code."""
    input_ids, pixel_values, _ = model._chat_inputs(tokenizer, img, query, [], {})
    return input_ids, pixel_values


def main(folder: str, name: str, result_path: str) -> None:
    torch.manual_seed(0)
    result = {"transformers": transformers.__version__}
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    models = [auto.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
              for auto in (AutoModelForCausalLM, AutoModel, AutoModelForImageTextToText)]
    model, base = models[0], models[1]
    assert type(model).__name__ == config.architectures[0], type(model)
    for other in models[1:]:
        full = model.state_dict()
        if other is base and type(other) is not type(model):  # a base model: every weight but the LM head
            full = {k: v for k, v in full.items() if not k.startswith("lm_head.")}
        else:
            assert type(other) is type(model)
        assert list(other.state_dict()) == list(full), type(other)
        for (k, v), (k2, v2) in zip(full.items(), other.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), k
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__name__.endswith("Processor"), type(processor)
    # the tokenizer's class name differs by release (4.57.x LlamaTokenizerFast is 5.x LlamaTokenizer)
    result["classes"] = [type(x).__name__ for x in (config, model, processor)]
    result["tokenizer"] = type(tokenizer).__name__

    # a plain generate() on the neutral generation config: greedy, no warning, stops at EOS or max_new_tokens
    input_ids, pixel_values = single_inputs(model, tokenizer, "Describe the picture.", image(1))
    logged = LoggedWarnings()
    logging.getLogger("transformers").addHandler(logged)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(input_ids=input_ids, pixel_values=pixel_values)
    logging.getLogger("transformers").removeHandler(logged)
    noise = [str(w.message) for w in caught] + logged.messages
    assert not noise, f"plain generate() warned: {noise}"
    new = out[0, input_ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    assert (new and new[-1] == eos) or len(new) == model.generation_config.max_new_tokens, len(new)
    assert eos not in new[:-1]
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0, -1]
        if type(base) is not type(model):
            hidden = base(input_ids=input_ids, pixel_values=pixel_values).last_hidden_state[0, -1]
            torch.testing.assert_close(model.lm_head(hidden), logits)
    result["first_logits"] = logits.tolist()
    result["plain_generate"] = new[:16]

    # the repetition penalty over a prompt whose image placeholders may lie past the LM head (CogVLM's do; the
    # releases before ~5.2x fail on them without compat.placeholder_safe_processors), re-derived from the raw logits
    penalty = 1.3
    out = model.generate(input_ids=input_ids, pixel_values=pixel_values, do_sample=False, max_new_tokens=3,
                         min_length=0, repetition_penalty=penalty, output_scores=True, output_logits=True,
                         return_dict_in_generate=True)
    for step, (score, raw) in enumerate(zip(out.scores, out.logits)):
        seen = out.sequences[0, :input_ids.shape[1] + step]
        seen = seen[seen < raw.shape[-1]].unique()
        expected = raw.clone()
        picked = expected[0, seen]
        expected[0, seen] = torch.where(picked < 0, picked * penalty, picked / penalty)
        torch.testing.assert_close(score, expected)

    # chat and stream_chat (greedy), then a second turn over a history longer than the model's positions
    greedy = dict(do_sample=False, max_new_tokens=8, min_length=0)
    response, history = model.chat(tokenizer, image(2), "What is in the picture?", history=[], **greedy)
    streamed = list(model.stream_chat(tokenizer, image(2), "What is in the picture?", history=[], **greedy))
    assert streamed and streamed[-1][0] == response, (streamed[-1:], response)
    long_history = history + [("word " * 150, "answer " * 100)] * 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second, _ = model.chat(tokenizer, image(2), "And the colours?", history=long_history, **greedy)
    assert any("history turn" in str(w.message) for w in caught), [str(w.message) for w in caught]
    result["chat"] = [response, second]

    # a ragged batch (left padding, image and text-only rows) equals each row alone
    rows = [("What is shown here?", image(3)), ("A text-only question that is longer than the others", None),
            ("Colours?", image(4))]
    singles = [single_inputs(model, tokenizer, q, img) for q, img in rows]
    kw = dict(do_sample=False, max_new_tokens=5, min_length=0, eos_token_id=None)
    expected = [model.generate(input_ids=ids, pixel_values=pv, **kw)[0, ids.shape[1]:].tolist() for ids, pv in singles]
    width = max(ids.shape[1] for ids, _ in singles)
    pad = model.generation_config.pad_token_id
    batch_ids = torch.tensor([[pad] * (width - ids.shape[1]) + ids[0].tolist() for ids, _ in singles])
    mask = torch.tensor([[0] * (width - ids.shape[1]) + [1] * ids.shape[1] for ids, _ in singles])
    batch_pixels = torch.cat([pv for _, pv in singles if pv is not None])
    got = model.generate(input_ids=batch_ids, attention_mask=mask, pixel_values=batch_pixels, **kw)[:, width:]
    assert got.tolist() == expected, (got.tolist(), expected)
    result["batch"] = expected

    # the static cache gives the dynamic cache's tokens
    ids, pv = singles[0]
    static = model.generate(input_ids=ids, pixel_values=pv, cache_implementation="static", **kw)[0, ids.shape[1]:]
    assert static.tolist() == expected[0], (static.tolist(), expected[0])

    # save_pretrained + reload
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            again = reloaded(input_ids=input_ids, pixel_values=pixel_values).logits[0, -1]
        assert torch.equal(again, logits), (again - logits).abs().max()

    # peft LoRA training step with gradient checkpointing
    from peft import LoraConfig, get_peft_model

    train_model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    enable = getattr(train_model, "activation_checkpointing_enable", None) or train_model.gradient_checkpointing_enable
    enable()
    train_model.enable_input_require_grads()
    peft_model = get_peft_model(train_model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[name],
                                                        lora_dropout=0.0, init_lora_weights=False))
    peft_model.train()
    lora = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora), sorted(lora)[:5]
    before = {n: p.detach().clone() for n, p in lora.items()}
    optimizer = torch.optim.SGD(lora.values(), lr=0.1)
    labels = input_ids.clone()
    # no use_cache argument: the text config's default (on) must not make a cache under checkpointing (on releases
    # before 5.24 the recomputed layers appended their keys to it a second time)
    loss = peft_model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss
    assert torch.isfinite(loss), loss
    loss.backward()
    grads = [p.grad for p in lora.values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    optimizer.step()
    assert any(not torch.equal(before[n], p) for n, p in lora.items())
    result["lora_loss"] = loss.item()

    with open(result_path, "w") as f:
        json.dump(result, f)
    print(f"{name}: all checks passed on transformers {transformers.__version__}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
