"""``visualglm-finetune merge``: a peft adapter merged into its base → a complete hub folder (CONTRACTS §2),
written by the same writer as the converter (``hub_export.writer.write_hub_folder`` inside ``staged_output``:
built beside ``--out`` and renamed into place only when complete)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .encode import family_of
from .model import load_config, load_processing, model_class

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _stored_dtype(config) -> torch.dtype:
    name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return DTYPES.get(name.replace("torch.", ""), torch.float32)


def write_model_folder(model, config, folder: Path, base: str | Path, *, dtype: torch.dtype, source_note: str,
                       max_shard_size="5GB", progress: bool = True):
    """Write ``model`` (a plain family model, no peft wrapper) as a complete hub folder into ``folder`` (empty)."""
    from modeling_visualglm.hub_export.families import FAMILIES
    from modeling_visualglm.hub_export.writer import write_hub_folder

    tokenizer, _ = load_processing(base, config)
    tied = set(model._tied_weights_keys or {}) if getattr(config, "tie_word_embeddings", False) else set()
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items() if k not in tied}
    entries = [((k,), v.nbytes, lambda k=k, v=v: {k: v}) for k, v in state.items()]
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.use_cache = True
    return write_hub_folder(folder, family=FAMILIES[family_of(config)], config=config, weight_entries=entries,
                            dtype=dtype, tokenizer=tokenizer, max_shard_size=max_shard_size, source_note=source_note,
                            progress=progress)


def merge(base: str | Path, adapter: str | Path, out: str | Path, *, dtype: str = "keep", force: bool = False,
          progress: bool = True):
    """Load ``base`` in float32, apply and merge ``adapter`` (LoRA folded into the weights, ``modules_to_save``
    copies put in place), write the complete hub folder ``out`` in the base's dtype (or ``dtype``)."""
    from peft import PeftModel

    from modeling_visualglm.hub_export.writer import staged_output

    config = load_config(base)
    out_dtype = _stored_dtype(config) if dtype == "keep" else DTYPES[dtype]
    model = model_class(config).from_pretrained(str(base), dtype=torch.float32)
    with warnings.catch_warnings():
        # peft <= 0.18 reads `is_gradient_checkpointing`, which transformers 5.24 deprecates (not our call)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    note = (f"Fine-tuned with `visualglm-finetune` (modeling_visualglm): the adapter {Path(adapter).name} merged "
            f"into {Path(base).name}.")
    with staged_output(out, force=force, marker={"format": "visualglm-finetune merge"}) as tmp:
        result = write_model_folder(model, model.config, tmp, base, dtype=out_dtype, source_note=note,
                                    progress=progress)
    return result
