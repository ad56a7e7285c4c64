"""``visualglm-finetune``: LoRA / QLoRA / full fine-tuning of VisualGLM-6B, CogVLM/CogVLM2 and MiniGPT-4 hub
folders on transformers' ``Trainer`` + peft (tooling, never copied into a hub folder).

- :mod:`.data`    the four data formats users already have → one :class:`~.data.Sample` type;
- :mod:`.encode`  a sample → ``input_ids`` + ``labels`` masked exactly as each original masks them;
- :mod:`.collate` the dataset (images through the folder's own image processor) and the padding collator;
- :mod:`.model`   loading, LoRA default targets per family, freeze switches, QLoRA;
- :mod:`.trainer` the ``Trainer`` subclass (token-weighted shifted cross-entropy, equal on 1 or N processes);
- :mod:`.merge`   adapter → merged complete hub folder (``hub_export.writer``);
- :mod:`.cli`     the command line;
- :mod:`.teach`   does it learn? a LoRA run on a shipped tiny trained model, checked on fresh pictures.
"""
