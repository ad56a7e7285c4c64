"""``visualglm-demo``: the whole pipeline on an embedded tiny model, no downloads.

1. train a tiny SentencePiece tokenizer laid out like ChatGLM-6B's ``ice_text.model``;
2. build a seeded, fully random 2-layer VisualGLM and write it in SwissArmyTransformer's checkpoint layout
   (``latest``, ``1/mp_rank_00_model_states.pt`` = ``{'module': state_dict}``, ``model_config.json``), with
   ChatGLM's qkv in the current SAT (blocked) order;
3. ``visualglm-convert --format sat-visualglm`` → a hub folder;
4. ``visualglm-export check`` on it (fresh interpreter that cannot import this package);
5. ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``, compare its logits with the
   in-process model, and chat about the bundled image (``chat`` and ``stream_chat``).

The tiny model is random: its answers are gibberish made of the tiny tokenizer's pieces. What the demo
shows is that every stage works and that the converted folder reproduces the original weights exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


class Stages:
    def __init__(self):
        self.start = time.perf_counter()
        self.rows = []

    def run(self, name, fn, *args, **kwargs):
        print(f"[{len(self.rows) + 1}] {name} ...", flush=True)
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        dt = time.perf_counter() - t0
        self.rows.append((name, dt))
        print(f"    done in {dt:.2f}s", flush=True)
        return result

    def summary(self):
        print("\nstage timings:")
        for name, dt in self.rows:
            print(f"  {dt:7.2f}s  {name}")
        print(f"  {time.perf_counter() - self.start:7.2f}s  total")


def interleaved_to_blocked_qkv(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Our ChatGLM qkv rows are [head h: q, k, v]; current SAT checkpoints store [Q all heads; K; V]."""
    head_dim = t.shape[0] // (3 * num_heads)
    rest = t.shape[1:]
    return t.reshape(num_heads, 3, head_dim, *rest).transpose(0, 1).reshape(t.shape)


def to_sat_state_dict(model, qkv_layout: str = "blocked") -> dict:
    """Our names → SwissArmyTransformer's VisualGLMModel names (THUDM/VisualGLM-6B @e314fb9)."""
    cfg = model.config
    eva = "mixins.eva.model."
    sd = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().clone().contiguous()
        if name.startswith("language_model."):
            rest = name[len("language_model."):]
            if rest.endswith(("query_key_value.weight", "query_key_value.bias")) and qkv_layout == "blocked":
                tensor = interleaved_to_blocked_qkv(tensor, cfg.text_config.num_attention_heads)
            sd["transformer." + rest] = tensor
        elif name == "lm_head.weight":
            sd["mixins.chatglm-final.lm_head.weight"] = tensor
        elif name.startswith("vision_model."):
            rest = name[len("vision_model."):]
            if rest.startswith("embeddings.patch_embedding."):
                sd[eva + "vit.mixins.patch_embedding.proj." + rest.split(".")[-1]] = tensor
            elif rest == "embeddings.cls_embedding":
                sd[eva + "vit.transformer.word_embeddings.weight"] = tensor
            elif rest == "embeddings.position_embedding":
                sd[eva + "vit.transformer.position_embeddings.weight"] = tensor
            elif rest.startswith("post_layernorm."):
                sd[eva + "vit.mixins.cls.ln_vision." + rest.split(".")[-1]] = tensor
            else:
                sd[eva + "vit.transformer." + rest] = tensor
        elif name.startswith("qformer."):
            rest = name[len("qformer."):]
            if rest == "query_tokens":
                sd[eva + "qformer.transformer.word_embeddings.weight"] = tensor
            else:
                sd[eva + "qformer.transformer." + rest] = tensor
        elif name.startswith("glm_proj."):
            sd[eva + name] = tensor
        else:
            raise KeyError(f"no SAT name for {name}")
    # SAT's ChatGLM also saves an unused absolute-position table (the converter drops it)
    sd["transformer.position_embeddings.weight"] = torch.zeros(cfg.text_config.max_position_embeddings,
                                                               cfg.text_config.hidden_size)
    return sd


def sat_model_config(cfg) -> dict:
    """The fields of SAT's ``model_config.json`` for VisualGLM (values of the tiny config)."""
    v, q, t = cfg.vision_config, cfg.qformer_config, cfg.text_config
    return {
        "model_class": "VisualGLMModel",
        "tokenizer_type": "THUDM/chatglm-6b",
        "num_layers": t.num_hidden_layers,
        "hidden_size": t.hidden_size,
        "num_attention_heads": t.num_attention_heads,
        "vocab_size": t.vocab_size,
        "layernorm_order": "post",
        "model_parallel_size": 1,
        "max_sequence_length": t.max_position_embeddings,
        "inner_hidden_size": t.intermediate_size,
        "layernorm_epsilon": t.layer_norm_eps,
        "image_length": q.num_query_tokens,
        "bos_token_id": t.bos_token_id,
        "mask_token_id": t.mask_token_id,
        "gmask_token_id": t.gmask_token_id,
        "pad_token_id": t.pad_token_id,
        "eva_args": {
            "num_layers": v.num_hidden_layers, "hidden_size": v.hidden_size,
            "num_attention_heads": v.num_attention_heads, "vocab_size": 1, "layernorm_order": "pre",
            "model_parallel_size": 1, "max_sequence_length": v.num_patches + 1,
            "inner_hidden_size": v.intermediate_size, "use_final_layernorm": False,
            "layernorm_epsilon": v.layer_norm_eps, "image_size": [v.image_size, v.image_size], "pre_len": 1,
            "post_len": 0, "in_channels": v.num_channels, "num_classes": 0, "patch_size": v.patch_size,
        },
        "qformer_args": {
            "num_layers": q.num_hidden_layers, "hidden_size": q.hidden_size,
            "num_attention_heads": q.num_attention_heads, "vocab_size": q.num_query_tokens,
            "layernorm_order": "post", "model_parallel_size": 1, "max_sequence_length": 0,
            "is_decoder": [i % q.cross_attention_frequency == 0 for i in range(q.num_hidden_layers)],
            "cross_attn_hidden_size": v.hidden_size, "layernorm_epsilon": q.layer_norm_eps,
            "inner_hidden_size": q.intermediate_size,
        },
    }


def write_sat_checkpoint(model, folder: Path, qkv_layout: str = "blocked") -> Path:
    """SAT's inference ``save_checkpoint`` layout: ``latest``, ``1/mp_rank_00_model_states.pt``, ``model_config.json``."""
    folder.mkdir(parents=True, exist_ok=False)
    (folder / "1").mkdir()
    torch.save({"module": to_sat_state_dict(model, qkv_layout)}, folder / "1" / "mp_rank_00_model_states.pt")
    (folder / "latest").write_text("1")
    (folder / "model_config.json").write_text(json.dumps(sat_model_config(model.config), indent=4))
    return folder


def run_cli(module: str, *args: str) -> None:
    cmd = [sys.executable, "-m", module, *args]
    print("    $ " + " ".join(["python -m", module, *args]), flush=True)
    proc = subprocess.run(cmd, text=True, capture_output=True)
    for line in (proc.stdout or "").strip().splitlines()[-12:]:
        print("    | " + line)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{module} failed with exit code {proc.returncode}")


def build_tiny(tokenizer, seed: int):
    from ..modeling_visualglm import VisualGLMForConditionalGeneration
    from .tiny_models import randomize_, tiny_visualglm_config

    torch.manual_seed(seed)
    model = VisualGLMForConditionalGeneration(tiny_visualglm_config(tokenizer, image_size=56)).eval()
    return randomize_(model, seed=seed)


def main(argv=None) -> int:
    from .tiny_models import demo_image_path
    from .tiny_tokenizer import make_tiny_chatglm_tokenizer

    ap = argparse.ArgumentParser(prog="visualglm-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="keep all stages' files in this folder (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--query", default="这张图片里有什么？")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    args = ap.parse_args(argv)

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="visualglm-demo-"))
    if args.out and work.exists() and any(work.iterdir()):
        ap.error(f"--out {work} exists and is not empty")
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    try:
        tokenizer = stages.run("train a tiny ice_text-like SentencePiece tokenizer", make_tiny_chatglm_tokenizer,
                               work / "tokenizer")
        model = stages.run(f"build a seeded random tiny VisualGLM (seed {args.seed})", build_tiny, tokenizer,
                           args.seed)
        print(f"    {sum(p.numel() for p in model.parameters()):,} parameters")
        sat_dir = stages.run("write it in SwissArmyTransformer's checkpoint layout", write_sat_checkpoint, model,
                             work / "sat-visualglm")
        hub_dir = work / "visualglm-tiny-hf"
        stages.run("visualglm-convert --format sat-visualglm", run_cli, "modeling_visualglm.conversion.cli", "--format",
                   "sat-visualglm", "--src", str(sat_dir), "--tokenizer", str(work / "tokenizer" / "ice_text.model"),
                   "--out", str(hub_dir), "--no-progress")
        stages.run("visualglm-export check (fresh interpreter)", run_cli, "modeling_visualglm.hub_export.cli", "check", "--folder",
                   str(hub_dir))

        def load():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(hub_dir), trust_remote_code=True)
            loaded = AutoModelForCausalLM.from_pretrained(str(hub_dir), trust_remote_code=True).eval()
            return tok, loaded

        hub_tok, loaded = stages.run("AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)", load)
        print(f"    loaded class: {type(loaded).__module__}.{type(loaded).__name__}")

        def compare():
            from transformers import AutoProcessor

            from ..processing_visualglm import build_visualglm_prompt

            processor = AutoProcessor.from_pretrained(str(hub_dir), trust_remote_code=True)

            inputs = processor(images=[demo_image_path()], text=[build_visualglm_prompt(args.query)],
                               return_tensors="pt")
            with torch.no_grad():
                a = model(**inputs).logits
                b = loaded(**inputs).logits
            diff = (a - b).abs().max().item()
            print(f"    max |logits(original) - logits(converted)| = {diff:.3g}")
            if diff != 0.0:
                raise SystemExit("the converted model does not reproduce the original")

        stages.run("compare logits: in-process model vs converted folder", compare)

        def chat():
            kwargs = dict(do_sample=False, max_new_tokens=args.max_new_tokens, min_length=0)
            response, history = loaded.chat(hub_tok, demo_image_path(), args.query, **kwargs)
            print(f"    Q: {args.query}\n    A: {response!r}")
            follow_up = "What colour is the circle?"
            parts = [p for p, _ in loaded.stream_chat(hub_tok, demo_image_path(), follow_up, history=history,
                                                      **kwargs)]
            print(f"    Q: {follow_up}\n    A (streamed, {len(parts)} updates): {parts[-1] if parts else ''!r}")

        stages.run(f"chat about the bundled image ({demo_image_path()})", chat)
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    stages.summary()
    if args.out:
        print(f"files kept in {work}")
    print("demo finished: every stage worked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
