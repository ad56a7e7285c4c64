"""visualglm-finetune teaches (issue 16): on each family's shipped tiny trained model, a CPU LoRA run of
`visualglm-finetune` (its Python entry, the same argv as the command line) on fresh pictures teaches "crimson" as
the answer to "What colour is the shape?" for red shapes; base + adapter, loaded with ``PeftModel.from_pretrained``,
then answers "crimson" on other fresh red pictures, and every other question (the other colours, shape / where /
describe in English and Chinese, 红色 for the Chinese colour question on red shapes) as before.

The experiment is ``modeling_visualglm.tools.finetune.teach`` (docs/finetuning.md, "Does it learn?"); this file
only checks its report. Thresholds (``teach.TAUGHT_MIN`` / ``KEPT_MIN`` / ``RETAINED_MIN``):

- taught ≥ 0.9: at most 2 of the 20 red pictures may miss the new word (a 2-layer, 64-wide model learning a word
  of 5-7 new pieces in 750 steps). Here all three families get 20 of 20; with other data / training / picture
  seeds (1-3, 12 red pictures) the worst run had 11 of 12.
- retained ≥ 0.95: of the ~260 other questions the base model answers right on these pictures, at most 5% may
  change. The shipped models are at 98.7-99.0% held out, so some fresh pictures sit on a decision boundary (a small
  circle vs a square, "left" vs "top left", yellow vs orange) and any LoRA update flips a few of them: here 0.992 to
  0.996, at seeds 1-3 0.957 to 1.0. Forgetting looks different: LoRA on the attention alone, for example, keeps
  VisualGLM at 0.934 and leaves MiniGPT-4 / CogVLM at 16-17 of 20 taught.
- kept ≥ 0.9 in absolute terms (the base model's own misses count here; it is at 98.5-100% on these pictures),
  and "crimson" never answers another question.

Measured on the project's 2-core CPU (idle): about 50 s per family (writing the hub folder and 120 pictures 2-6 s,
training 33-41 s, asking base and tuned 8-10 s), 2.5 min for the file.
"""

from __future__ import annotations

import pytest

from modeling_visualglm.tools.finetune import teach


@pytest.mark.parametrize("family", ["visualglm", "minigpt4", "cogvlm"])
def test_lora_teaches_a_new_answer_and_keeps_the_others(tmp_path, family):
    report, seconds = teach.run(family, tmp_path)
    summary = f"{family}: {report.summary()}; {seconds}\n" + "\n".join(report.misses())
    assert report.base_taught[0] == 1.0, summary  # the base model says "red": there was something to change
    assert report.taught[0] >= teach.TAUGHT_MIN, summary
    assert report.retained[0] >= teach.RETAINED_MIN, summary
    assert report.kept[0] >= teach.KEPT_MIN, summary
    # the new word is confined to the taught question: nothing else says it
    assert not any(teach.NEW_WORD in answer for key, answer in report.tuned.items() if not teach.is_taught(*key))
