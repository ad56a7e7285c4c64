"""End to end for ``sat-visualglm`` and ``hf-visualglm``.

A tiny seeded random VisualGLM (ours) is written in the original layouts by the converter's rule tables run
backwards (``conversion.apply.to_original``: our names → SAT names, interleaved → blocked qkv where SAT stores it
blocked), checked independently by SwissArmyTransformer's own model classes (see "the original layouts" below):

- SAT: the names are checked by loading them strictly into SwissArmyTransformer's own module tree
  (sat 0.4.12 ``ChatGLMModel`` + the VisualGLM-6B ``eva`` mixin: ``ViTModel`` with ``ln_vision``, a
  ``BaseModel`` Q-Former, ``glm_proj``), then saved with SAT's own ``save_checkpoint`` (``latest``,
  ``1/mp_rank_00_model_states.pt`` holding ``{'module': sd}``, ``model_config.json``), plus the
  ``transformer.position_embeddings.weight`` older SAT checkpoints carry;
- THUDM-HF: ``pytorch_model-0000k-of-00003.bin`` shards + index, ``image_encoder.`` prefix, interleaved qkv,
  per-layer ``rotary_emb.inv_freq``, THUDM's ``config.json`` / ``tokenizer_config.json`` and ``ice_text.model``.

Then ``python -m conversion.cli`` → ``visualglm-export check`` → logits in a fresh interpreter that cannot
import our packages must equal the in-process model's bit for bit (float32); a push to the local fake Hub
and ``from_pretrained`` from it give identical weights and the same chat answer. Bad inputs fail with
specific messages and leave nothing at ``--out``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_checks_pass, run_parallel
import torch
from torch import nn

from modeling_visualglm.image_processing_visualglm import VisualGLMImageProcessor
from modeling_visualglm.modeling_visualglm import VisualGLMForConditionalGeneration
from modeling_visualglm.processing_visualglm import build_visualglm_inputs
from modeling_visualglm.tools.tiny_models import demo_image_path, randomize_, tiny_visualglm_config

from modeling_visualglm.conversion.apply import to_original
from modeling_visualglm.conversion.cli import main as convert_main
from modeling_visualglm.hub_export.check import blocker_source
from modeling_visualglm.hub_export.code import import_closure
from modeling_visualglm.hub_export.families import package_dir
from modeling_visualglm.hub_export.writer import INCOMPLETE_MARKER, OUTPUT_MARKER

PY = sys.executable
THREADS = torch.get_num_threads()
QUERY = "Describe the image."


# --- the model ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ours(tiny_tokenizer):
    torch.manual_seed(0)
    model = VisualGLMForConditionalGeneration(tiny_visualglm_config(tiny_tokenizer)).eval()
    return randomize_(model, seed=1)


def variant(ours, **text_overrides):
    """A copy of ``ours`` with text-config changes (untied head, fp16-rounded rotary) and the same weights."""
    cfg = ours.config.to_dict()
    cfg["text_config"].update(text_overrides)
    if "tie_word_embeddings" in text_overrides:
        cfg["tie_word_embeddings"] = text_overrides["tie_word_embeddings"]
    model = VisualGLMForConditionalGeneration(type(ours.config)(**cfg)).eval()
    missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


@pytest.fixture(scope="module")
def untied_head(ours):
    return torch.randn(ours.lm_head.weight.shape, generator=torch.Generator().manual_seed(5)) * 0.2


@pytest.fixture(scope="module")
def inputs(ours, tiny_tokenizer):
    ids = build_visualglm_inputs(tiny_tokenizer, QUERY, has_image=True, num_image_tokens=ours.config.num_image_tokens)
    pixels = VisualGLMImageProcessor(size=ours.config.vision_config.image_size)(demo_image_path(), return_tensors="pt")
    return {"input_ids": torch.tensor([ids]), "pixel_values": pixels["pixel_values"]}


# --- the original layouts -------------------------------------------------------------------------------
# The SAT files are written with the converter's own rule table run backwards (conversion.apply.to_original). On its
# own that could not catch a wrong rule: the forward conversion would undo it and the logits of the converted folder
# would still equal ours bit for bit. The independent side is SwissArmyTransformer: its own module tree loads the
# written names strictly (write_sat), and its own ChatGLM, ViT and Q-Former classes, run on the written weights, give
# our model's outputs (test_swissarmytransformer_runs_the_written_checkpoint_like_ours). So SAT(to_original(ours)) ==
# ours, whatever our rules say, and convert(to_original(ours)) == ours. The THUDM-HF files are the SAT names renamed
# the way THUDM's convert script did it (write_hf), not through the hf-visualglm table.

def to_sat(model, qkv_layout: str, lm_head: torch.Tensor | None = None) -> dict:
    sd = dict(model.state_dict())
    if lm_head is not None:
        sd["lm_head.weight"] = lm_head
    return to_original(sd, "sat-visualglm", model.config, qkv_layout=qkv_layout)


def build_sat_visualglm(cfg):
    """SwissArmyTransformer's VisualGLM-6B module tree (structure of THUDM/VisualGLM-6B model/visualglm.py and
    model/blip2.py @e314fb9), tiny sizes; returns (model, args) with args as SAT's get_args builds them."""
    from sat_reference import blip2_sat_classes

    EVAViT, QFormer = blip2_sat_classes()
    from sat.model import BaseMixin
    from sat.model.official.chatglm_model import ChatGLMModel

    v, q, t = cfg.vision_config, cfg.qformer_config, cfg.text_config

    class BLIP2(nn.Module):
        def __init__(self, eva_args, qformer_args):
            super().__init__()
            self.vit = EVAViT(EVAViT.get_args(**eva_args))
            self.qformer = QFormer(QFormer.get_args(**qformer_args))
            self.glm_proj = nn.Linear(q.hidden_size, t.hidden_size)

    class ImageMixin(BaseMixin):
        def __init__(self, args):
            super().__init__()
            self.model = BLIP2(args.eva_args, args.qformer_args)

    class VisualGLMModel(ChatGLMModel):
        def __init__(self, args):
            super().__init__(args)
            self.add_mixin("eva", ImageMixin(args))

        @classmethod
        def add_model_specific_args(cls, parser):
            group = parser.add_argument_group("VisualGLM")
            group.add_argument("--image_length", type=int, default=32)
            group.add_argument("--eva_args", type=json.loads, default={})
            group.add_argument("--qformer_args", type=json.loads, default={})
            return super().add_model_specific_args(parser)

    eva_args = dict(
        num_layers=v.num_hidden_layers, hidden_size=v.hidden_size, num_attention_heads=v.num_attention_heads,
        vocab_size=1, layernorm_order="pre", model_parallel_size=1,
        max_sequence_length=(v.image_size // v.patch_size) ** 2 + 1, inner_hidden_size=v.intermediate_size,
        use_final_layernorm=False, layernorm_epsilon=v.layer_norm_eps, image_size=[v.image_size, v.image_size],
        pre_len=1, post_len=0, in_channels=3, num_classes=0, patch_size=v.patch_size,
    )
    qformer_args = dict(
        num_layers=q.num_hidden_layers, hidden_size=q.hidden_size, num_attention_heads=q.num_attention_heads,
        vocab_size=q.num_query_tokens, layernorm_order="post", model_parallel_size=1, max_sequence_length=0,
        is_decoder=[i % q.cross_attention_frequency == 0 for i in range(q.num_hidden_layers)],
        cross_attn_hidden_size=v.hidden_size, layernorm_epsilon=q.layer_norm_eps, inner_hidden_size=q.intermediate_size,
    )
    args = VisualGLMModel.get_args(
        num_layers=t.num_hidden_layers, hidden_size=t.hidden_size, num_attention_heads=t.num_attention_heads,
        vocab_size=t.vocab_size, inner_hidden_size=t.intermediate_size, max_sequence_length=t.max_position_embeddings,
        layernorm_order="post", layernorm_epsilon=t.layer_norm_eps, image_length=q.num_query_tokens,
        eva_args=eva_args, qformer_args=qformer_args, bos_token_id=t.bos_token_id, mask_token_id=t.mask_token_id,
        gmask_token_id=t.gmask_token_id, pad_token_id=t.pad_token_id, tokenizer_type="THUDM/chatglm-6b",
    )
    return VisualGLMModel(args), args


@pytest.fixture(scope="module")
def sat_tree(ours):
    return build_sat_visualglm(ours.config)


def write_sat(folder: Path, sat_tree, sd: dict, position_embeddings: bool = True):
    """Save ``sd`` with SAT's save_checkpoint after checking its names against SAT's own module tree."""
    from sat.training.model_io import save_checkpoint

    sat_model, args = sat_tree
    sd = dict(sd)
    sd["mixins.chatglm-attn.rotary_emb.inv_freq"] = sat_model.state_dict()["mixins.chatglm-attn.rotary_emb.inv_freq"]
    sat_model.load_state_dict(sd, strict=True)  # every name is one SAT has, and nothing is missing
    if position_embeddings:  # older SAT ChatGLM checkpoints carry an unused absolute-position table
        hidden = sd["transformer.word_embeddings.weight"].shape[1]
        sd["transformer.position_embeddings.weight"] = torch.randn(args.max_sequence_length, hidden)
    sat_model.state_dict = lambda *a, **k: sd  # save exactly these tensors through SAT's own writer
    try:
        args.save, args.mode = str(folder), "inference"
        save_checkpoint(1, sat_model, None, None, args)
    finally:
        del sat_model.state_dict
    return folder


def write_hf(folder: Path, ours, tokenizer_dir: Path, shards: int = 3) -> Path:
    """THUDM/visualglm-6b layout (greensheng/chatglm-6b branch ``visual`` @11f77d9)."""
    folder.mkdir(parents=True)
    cfg = ours.config
    sat = to_sat(ours, "interleaved")
    hf = {}
    for k, t in sat.items():
        if k.startswith("mixins.eva.model."):
            hf["image_encoder." + k[len("mixins.eva.model."):]] = t
        elif k == "mixins.chatglm-final.lm_head.weight":
            hf["lm_head.weight"] = t
        else:
            hf[k] = t
    hd = cfg.text_config.head_dim
    for i in range(cfg.text_config.num_hidden_layers):  # THUDM's persistent rotary buffer (2D: dim hd/2)
        hf[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = 1.0 / (
            10000 ** (torch.arange(0, hd // 2, 2).float() / (hd // 2))).half()
    keys = sorted(hf)
    weight_map = {}
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: hf[k] for k in keys[s::shards]}
        torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.nbytes for t in hf.values())}, "weight_map": weight_map}, indent=2))
    v, q, t = cfg.vision_config, cfg.qformer_config, cfg.text_config
    config = {
        "_name_or_path": "THUDM/visualglm-6b", "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGenerationWithImage"},
        "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "mask_token_id": t.mask_token_id,
        "gmask_token_id": t.gmask_token_id, "pad_token_id": t.pad_token_id, "hidden_size": t.hidden_size,
        "inner_hidden_size": t.intermediate_size, "layernorm_epsilon": t.layer_norm_eps,
        "max_sequence_length": t.max_position_embeddings, "num_attention_heads": t.num_attention_heads,
        "num_layers": t.num_hidden_layers, "position_encoding_2d": True, "torch_dtype": "float16",
        "transformers_version": "4.23.1", "use_cache": True, "vocab_size": t.vocab_size,
        "image_length": q.num_query_tokens,
        "eva_config": {"num_layers": v.num_hidden_layers, "hidden_size": v.hidden_size,
                       "num_attention_heads": v.num_attention_heads, "vocab_size": 1, "layernorm_order": "pre",
                       "model_parallel_size": 1, "max_sequence_length": (v.image_size // v.patch_size) ** 2 + 1,
                       "inner_hidden_size": v.intermediate_size, "use_final_layernorm": False,
                       "layernorm_epsilon": v.layer_norm_eps, "image_size": [v.image_size, v.image_size],
                       "pre_len": 1, "post_len": 0, "in_channels": 3, "num_classes": 0, "patch_size": v.patch_size},
        "qformer_config": {"num_layers": q.num_hidden_layers, "hidden_size": q.hidden_size,
                           "num_attention_heads": q.num_attention_heads, "vocab_size": q.num_query_tokens,
                           "layernorm_order": "post", "model_parallel_size": 1, "max_sequence_length": 0,
                           "is_decoder": [i % 2 == 0 for i in range(q.num_hidden_layers)],
                           "cross_attn_hidden_size": v.hidden_size, "layernorm_epsilon": q.layer_norm_eps,
                           "inner_hidden_size": q.intermediate_size},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(tokenizer_dir / "ice_text.model", folder / "ice_text.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "name_or_path": "THUDM/visualglm-6b", "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>",
        "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
        "remove_space": False, "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer", "num_image_tokens": 0,
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}, indent=2))
    return folder


# --- sources and conversions (subprocess, as users run them) -------------------------------------------

def run_cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, ours, sat_tree, untied_head, tiny_tokenizer_dir):
    base = tmp_path_factory.mktemp("sources")
    return {
        "sat-blocked": write_sat(base / "sat-blocked", sat_tree, to_sat(ours, "blocked")),
        # the May-2023 layout (head-interleaved), here with a head that is not tied to the embeddings
        "sat-interleaved": write_sat(base / "sat-interleaved", sat_tree, to_sat(ours, "interleaved", untied_head)),
        "hf": write_hf(base / "hf", ours, Path(tiny_tokenizer_dir)),
    }


SHARD_LIMIT = 100_000


@pytest.fixture(scope="module")
def converted(tmp_path_factory, sources, tiny_tokenizer_dir):
    base = tmp_path_factory.mktemp("hub")
    commands = {
        # blocked is the default --qkv-layout; a small shard size exercises the sharded writer end to end
        "sat-blocked": ["--format", "sat-visualglm", "--src", sources["sat-blocked"], "--tokenizer",
                        tiny_tokenizer_dir, "--max-shard-size", str(SHARD_LIMIT)],
        "sat-interleaved": ["--format", "sat-visualglm", "--src", sources["sat-interleaved"], "--qkv-layout",
                            "interleaved", "--tokenizer", Path(tiny_tokenizer_dir) / "ice_text.model"],
        "hf": ["--format", "hf-visualglm", "--src", sources["hf"]],  # tokenizer found in the source folder
    }
    # the installed console script where there is one, else the module (same entry point)
    script = Path(PY).parent / "visualglm-convert"
    entry = {"sat-interleaved": ["-c", "import sys; from modeling_visualglm.conversion.cli import main; sys.exit(main())"]}
    if script.exists():
        entry["sat-interleaved"] = [script]
    procs = run_parallel({name: [*entry.get(name, ["-m", "modeling_visualglm.conversion.cli"]), *cmd, "--out", base / name]
                          for name, cmd in commands.items()}, python_for=lambda c: [] if str(c[0]) == str(script) else [PY])
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: {proc.stdout}\n{proc.stderr}"
    return {name: (base / name, proc) for name, proc in procs.items()}


@pytest.fixture(scope="module")
def references(ours, untied_head):
    untied = variant(ours, tie_word_embeddings=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(untied_head)
    return {
        "sat-blocked": ours,
        "sat-interleaved": untied,
        # THUDM's HF code rounds the rotary inv_freq to fp16; converting its folder keeps that (config flag)
        "hf": variant(ours, rope_fp16_inv_freq=True),
    }


# --- the happy path -------------------------------------------------------------------------------------

def test_coverage_report_and_folder_contents(converted):
    expected_code = {p.name for p in import_closure(package_dir(), [
        "modeling_visualglm", "configuration_visualglm", "tokenization_chatglm", "processing_visualglm",
        "image_processing_visualglm"])}
    assert {"chatglm.py", "eva_vit.py", "qformer.py", "attention.py", "configuration_blocks.py"} <= expected_code
    for name, (out, proc) in converted.items():
        assert "Coverage report" in proc.stdout and "every model key produced once" in proc.stdout
        assert "writing weights" in proc.stderr  # the progress bar goes to stderr, the report to stdout
        files = {p.name for p in out.iterdir()}
        code = {f for f in files if f.endswith(".py")}
        assert code == expected_code, name
        assert not code & {"llama.py", "modeling_cogvlm.py", "modeling_minigpt4.py", "testing_utils.py", "cli.py"}
        assert {"config.json", "generation_config.json", "README.md", "ice_text.model", "tokenizer_config.json",
                "processor_config.json", "chat_template.jinja"} <= files
        assert INCOMPLETE_MARKER not in files
        assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temporary folders left
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["auto_map"] == {
            "AutoConfig": "configuration_visualglm.VisualGLMConfig",
            "AutoModel": "modeling_visualglm.VisualGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_visualglm.VisualGLMForConditionalGeneration",
            "AutoModelForImageTextToText": "modeling_visualglm.VisualGLMForConditionalGeneration",
            "AutoProcessor": "processing_visualglm.VisualGLMProcessor",
            "AutoImageProcessor": "image_processing_visualglm.VisualGLMImageProcessor",
        }
        tok = json.loads((out / "tokenizer_config.json").read_text())
        assert tok["auto_map"]["AutoTokenizer"] == ["tokenization_chatglm.ChatGLMTokenizer", None]
        proc_cfg = json.loads((out / "processor_config.json").read_text())
        assert proc_cfg["image_processor"]["auto_map"]["AutoImageProcessor"] == \
            "image_processing_visualglm.VisualGLMImageProcessor"
    blocked, interleaved, hf = (converted[k][1].stdout for k in ("sat-blocked", "sat-interleaved", "hf"))
    assert "interleave_qkv_heads(num_heads=4)" in blocked and "interleave_qkv_heads" not in interleaved + hf
    assert "(dropped: SAT's BaseModel allocates absolute positions" in blocked
    assert "bit-equal in the source: written once, tied" in blocked and "tie_word_embeddings=False" in interleaved


def test_generation_config_and_model_card(converted, tiny_tokenizer):
    from huggingface_hub import ModelCard

    out = converted["sat-blocked"][0]
    gen = json.loads((out / "generation_config.json").read_text())
    gen.pop("transformers_version")
    # neutral (CONTRACTS §2): THUDM's sampling defaults live in CHAT_DEFAULTS, used by chat/stream_chat
    assert gen == {"max_new_tokens": 256, "bos_token_id": tiny_tokenizer.sop_token_id,
                   "eos_token_id": tiny_tokenizer.eop_token_id, "pad_token_id": tiny_tokenizer.pad_token_id}
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert "custom_code" in card.data.tags and card.data.base_model == "THUDM/visualglm-6b"
    assert card.data.license == "other"
    assert f'model_id = "{out}"' in card.text and "trust_remote_code=True" in card.text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["image_token_id"] == tiny_tokenizer.image_token_id


def test_streaming_writes_several_shards_with_an_index(converted, ours):
    from safetensors import safe_open

    out = converted["sat-blocked"][0]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 4 and shards == sorted(set(index["weight_map"].values()))
    expected = set(ours.state_dict()) - {"lm_head.weight"}  # tied: written once
    assert set(index["weight_map"]) == expected
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
            nbytes = sum(4 * torch.Size(s).numel() for s in sizes)
            assert nbytes <= SHARD_LIMIT or len(sizes) == 1  # only a single oversized tensor may exceed it
            total += nbytes
    assert index["metadata"]["total_size"] == total


def test_check_passes_on_converted_folders(converted):
    assert_checks_pass({name: converted[name][0] for name in ("sat-blocked", "hf")}, "chat: 'Describe the image.' ->")


LOGITS_CHILD = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from transformers import AutoModelForCausalLM
inputs = torch.load(sys.argv[2])
results = {}
for folder in sys.argv[4:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        results[folder] = model(**inputs).logits
torch.save(results, sys.argv[3])
"""


def test_fresh_interpreter_logits_are_bit_identical(converted, references, inputs, tmp_path):
    torch.save(inputs, tmp_path / "inputs.pt")
    folders = {name: str(out) for name, (out, _) in converted.items()}
    proc = run_cli("-I", "-c", blocker_source() + LOGITS_CHILD, str(THREADS), str(tmp_path / "inputs.pt"),
                   str(tmp_path / "logits.pt"), *folders.values())
    assert proc.returncode == 0, proc.stderr
    logits = torch.load(tmp_path / "logits.pt")
    for name, folder in folders.items():
        with torch.no_grad():
            ref = references[name](**inputs).logits
        assert logits[folder].dtype == torch.float32 and logits[folder].shape == ref.shape
        assert torch.equal(logits[folder], ref), f"{name}: max diff {(logits[folder] - ref).abs().max()}"


@torch.no_grad()
def test_swissarmytransformer_runs_the_written_checkpoint_like_ours(sources, sat_tree, ours, inputs, tiny_tokenizer):
    """The independent side of the parity tests: SAT's own classes on the SAT file that to_original wrote."""
    from helpers import rel_err

    sat_model, _ = sat_tree
    sd = torch.load(sources["sat-blocked"] / "1" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    sd.pop("transformer.position_embeddings.weight")  # the unused table older files carry (SAT's tree has none)
    sat_model.load_state_dict(sd, strict=True)
    sat_model.eval()
    # ChatGLM (text only): SAT builds its own 2D positions and prefix mask
    ids = torch.tensor([build_visualglm_inputs(tiny_tokenizer, QUERY, has_image=False, num_image_tokens=0)])
    mask, pos = sat_model.get_inputs(ids)
    assert rel_err(ours(input_ids=ids).logits, sat_model(input_ids=ids, position_ids=pos, attention_mask=mask)[0]) <= 1e-4
    # BLIP-2: ViT with ln_vision (one dummy id = the CLS lookup), Q-Former (ids 0..Q-1 = the queries), glm_proj
    blip2, ones = sat_model.mixins.eva.model, torch.tensor([[1.0]])
    image = blip2.vit(input_ids=torch.zeros(1, 1, dtype=torch.long), position_ids=None, attention_mask=ones,
                      image=inputs["pixel_values"])[0]
    assert rel_err(ours.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state, image) <= 1e-5
    queries = torch.arange(ours.config.qformer_config.num_query_tokens)[None]
    sat_q = blip2.qformer(input_ids=queries, position_ids=None, attention_mask=ones, encoder_outputs=image,
                          cross_attention_mask=ones)[0]
    assert rel_err(ours.qformer(encoder_hidden_states=image).last_hidden_state, sat_q) <= 1e-5
    assert torch.equal(ours.glm_proj(sat_q), blip2.glm_proj(sat_q))


def test_wrong_qkv_layout_changes_the_logits(sources, ours, inputs, tiny_tokenizer_dir, tmp_path):
    """The equality above can fail: reading the blocked SAT qkv as interleaved gives another model."""
    from safetensors.torch import load_file

    out = tmp_path / "wrong"
    rc = convert_main(["--format", "sat-visualglm", "--src", str(sources["sat-blocked"]), "--qkv-layout",
                       "interleaved", "--tokenizer", str(tiny_tokenizer_dir), "--out", str(out), "--no-progress"])
    assert rc == 0
    wrong = VisualGLMForConditionalGeneration(ours.config).eval()
    wrong.load_state_dict(load_file(str(out / "model.safetensors")), strict=False)
    with torch.no_grad():
        ref, bad = ours(**inputs).logits, wrong(**inputs).logits
    assert (bad - ref).abs().max() / ref.abs().max() > 1e-2


PULL_CHILD = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from transformers import AutoModelForCausalLM, AutoTokenizer
repo, image, out = sys.argv[2:5]
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
response, history = model.chat(tokenizer, image, "Describe the image.", max_new_tokens=8, min_length=0, do_sample=False)
torch.save({"state_dict": model.state_dict(), "response": response, "module": type(model).__module__}, out)
"""


def test_push_to_fake_hub_then_from_pretrained(converted, ours, tiny_tokenizer, tmp_path):
    from fake_hub import FakeHub
    from safetensors.torch import load_file

    out = converted["sat-blocked"][0]
    with FakeHub(lifetime=300) as hub:
        env = dict(os.environ, **hub.env(), HF_HOME=str(tmp_path / "hf_home"))
        proc = run_cli("-m", "modeling_visualglm.hub_export.cli", "push", "--folder", str(out), "--repo-id", "test-org/tiny-visualglm",
                       "--commit-message", "tiny VisualGLM", env=env)
        assert proc.returncode == 0, proc.stderr
        url = proc.stdout.strip().splitlines()[-1]
        sha = hub.state.repos["test-org/tiny-visualglm"].branches["main"]
        assert url == f"{hub.endpoint}/test-org/tiny-visualglm/commit/{sha}"
        remote = hub.files("test-org/tiny-visualglm")
        # the converter's marker describes this local copy: push leaves it out
        local = {p.name: p.read_bytes() for p in out.iterdir() if p.name != OUTPUT_MARKER}
        assert set(remote) - {".gitattributes"} == set(local)
        for name, data in local.items():
            if name != "README.md":
                assert remote[name] == data, name
        assert 'model_id = "test-org/tiny-visualglm"' in remote["README.md"].decode()
        proc = run_cli("-m", "modeling_visualglm.hub_export.cli", "push", "--folder", str(out), "--repo-id", "test-org/tiny-visualglm",
                       "--revision", "dev", env=env)
        assert proc.returncode == 0 and "dev" in hub.state.repos["test-org/tiny-visualglm"].branches, proc.stderr

        proc = run_cli("-I", "-c", blocker_source() + PULL_CHILD, str(THREADS), "test-org/tiny-visualglm",
                       demo_image_path(), str(tmp_path / "pulled.pt"), env=env)
        assert proc.returncode == 0, proc.stderr
    pulled = torch.load(tmp_path / "pulled.pt")
    assert pulled["module"].startswith("transformers_modules.test_hyphen_org.tiny_hyphen_visualglm.")
    folder_weights = {}
    for shard in out.glob("*.safetensors"):
        folder_weights.update(load_file(str(shard)))
    for name, tensor in folder_weights.items():
        assert torch.equal(pulled["state_dict"][name], tensor), name
    assert torch.equal(pulled["state_dict"]["lm_head.weight"], folder_weights["language_model.word_embeddings.weight"])
    expected, _ = ours.chat(tiny_tokenizer, demo_image_path(), QUERY, max_new_tokens=8, min_length=0, do_sample=False)
    assert isinstance(pulled["response"], str) and pulled["response"] == expected


# --- bad inputs: a specific message, exit code, and nothing left at --out -------------------------------

def copy_sat(src: Path, dst: Path, edit=None, payload=None) -> Path:
    shutil.copytree(src, dst)
    ckpt = dst / "1" / "mp_rank_00_model_states.pt"
    state = torch.load(ckpt, weights_only=True)
    if edit is not None:
        edit(state["module"])
    if payload is not None:
        state["payload"] = payload
    torch.save(state, ckpt)
    return dst


def convert_in_process(src, out, capsys, *extra, fmt="sat-visualglm", tokenizer=None):
    args = ["--format", fmt, "--src", str(src), "--out", str(out), "--no-progress", *extra]
    if tokenizer is not None:
        args += ["--tokenizer", str(tokenizer)]
    rc = convert_main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_nothing_left(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _del(key):
    return lambda sd: sd.pop(key)


def _add(key, value):
    return lambda sd: sd.__setitem__(key, value)


def _reshape(key):
    return lambda sd: sd.__setitem__(key, torch.zeros(sd[key].shape[0] + 1, *sd[key].shape[1:]))


BAD_EDITS = {
    "missing key": (_del("mixins.eva.model.qformer.transformer.layers.1.mlp.dense_h_to_4h.weight"),
                    "missing: 'qformer.layers.1.mlp.dense_h_to_4h.weight' [64, 32] needs source tensor "
                    "'mixins.eva.model.qformer.transformer.layers.1.mlp.dense_h_to_4h.weight'"),
    "extra key": (_add("mixins.eva.model.vit.transformer.layers.0.attention.rel_pos_bias", torch.zeros(3)),
                  "unexpected source tensor 'mixins.eva.model.vit.transformer.layers.0.attention.rel_pos_bias' [3]"),
    "wrong shape": (_reshape("transformer.layers.1.mlp.dense_4h_to_h.bias"),
                    "wrong shape: 'language_model.layers.1.mlp.dense_4h_to_h.bias' would be [65]"),
}


@pytest.mark.parametrize("case", list(BAD_EDITS))
def test_bad_tensors_are_reported(case, sources, tiny_tokenizer_dir, tmp_path, capsys):
    edit, message = BAD_EDITS[case]
    src = copy_sat(sources["sat-blocked"], tmp_path / "src", edit=edit)
    rc, out_text, err = convert_in_process(src, tmp_path / "out", capsys, tokenizer=tiny_tokenizer_dir)
    assert rc == 1
    assert "conversion failed" in err and "(1 problem)" in err and message in err
    assert_nothing_left(tmp_path / "out")


def test_all_problems_in_one_message(sources, tiny_tokenizer_dir, tmp_path, capsys):
    def edit(sd):
        for e, _ in BAD_EDITS.values():
            e(sd)

    src = copy_sat(sources["sat-blocked"], tmp_path / "src", edit=edit)
    rc, _, err = convert_in_process(src, tmp_path / "out", capsys, tokenizer=tiny_tokenizer_dir)
    assert rc == 1 and "(3 problems)" in err and all(m in err for _, m in BAD_EDITS.values())
    assert_nothing_left(tmp_path / "out")


def test_truncated_checkpoint(sources, tiny_tokenizer_dir, tmp_path, capsys):
    src = shutil.copytree(sources["sat-blocked"], tmp_path / "src")
    ckpt = src / "1" / "mp_rank_00_model_states.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size * 2 // 3])
    rc, _, err = convert_in_process(src, tmp_path / "out", capsys, tokenizer=tiny_tokenizer_dir)
    assert rc == 1 and "mp_rank_00_model_states.pt: truncated or corrupt" in err
    assert_nothing_left(tmp_path / "out")


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(sources, tiny_tokenizer_dir, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    src = copy_sat(sources["sat-blocked"], tmp_path / "src", payload=_Exploit(marker))
    rc, _, err = convert_in_process(src, tmp_path / "out", capsys, tokenizer=tiny_tokenizer_dir)
    assert rc == 1 and "refusing to load" in err and "system" in err
    assert not marker.exists()
    assert_nothing_left(tmp_path / "out")


def test_usage_errors_exit_2(sources, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        convert_main(["--format", "sat-visualglm-v2", "--src", str(sources["sat-blocked"]), "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and "invalid choice: 'sat-visualglm-v2'" in capsys.readouterr().err
    rc, _, err = convert_in_process(sources["hf"], tmp_path / "o", capsys, "--qkv-layout", "blocked", fmt="hf-visualglm")
    assert rc == 2 and "--format hf-visualglm does not take --qkv-layout" in err
    rc = convert_main(["--format", "sat-visualglm", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--format sat-visualglm needs --src" in capsys.readouterr().err
    assert_nothing_left(tmp_path / "o")
    # the real subprocess: the console entry point returns the same code
    proc = run_cli("-m", "modeling_visualglm.conversion.cli", "--format", "nope", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_existing_out_is_untouched_unless_forced(sources, tiny_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc, _, err = convert_in_process(sources["sat-blocked"], out, capsys, tokenizer=tiny_tokenizer_dir)
    assert rc == 2 and "already exists; pass --force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    # --force replaces only a folder this tool wrote (it carries OUTPUT_MARKER)
    rc, _, err = convert_in_process(sources["sat-blocked"], out, capsys, "--force", tokenizer=tiny_tokenizer_dir)
    assert rc == 2 and "visualglm-convert did not write" in err and OUTPUT_MARKER in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    ours = tmp_path / "ours"
    assert convert_in_process(sources["sat-blocked"], ours, capsys, tokenizer=tiny_tokenizer_dir)[0] == 0
    (ours / "keep.txt").write_text("precious")
    # --force with a failing source still leaves it untouched; with a good one it is replaced
    bad = copy_sat(sources["sat-blocked"], tmp_path / "bad", edit=_del("transformer.final_layernorm.bias"))
    rc, _, _ = convert_in_process(bad, ours, capsys, "--force", tokenizer=tiny_tokenizer_dir)
    assert rc == 1 and (ours / "keep.txt").read_text() == "precious"
    rc, _, _ = convert_in_process(sources["sat-blocked"], ours, capsys, "--force", tokenizer=tiny_tokenizer_dir)
    assert rc == 0 and not (ours / "keep.txt").exists() and (ours / "config.json").exists()
    assert (ours / OUTPUT_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "ours", "out"]


def test_missing_tokenizer_marks_the_folder_incomplete(sources, tmp_path, capsys):
    from modeling_visualglm.hub_export.check import check_folder
    from modeling_visualglm.hub_export.cli import main as export_main

    out = tmp_path / "out"
    rc, stdout, _ = convert_in_process(sources["sat-blocked"], out, capsys)
    assert rc == 0 and "INCOMPLETE (no tokenizer)" in stdout
    files = {p.name for p in out.iterdir()}
    assert {INCOMPLETE_MARKER, "config.json", "modeling_visualglm.py", "model.safetensors"} <= files
    assert "tokenizer_config.json" not in files and "ice_text.model" not in files
    assert json.loads((out / "config.json").read_text())["image_token_id"] is None
    assert "Incomplete folder" in (out / "README.md").read_text()
    assert check_folder(out) == 1
    assert "INCOMPLETE" in capsys.readouterr().err
    assert export_main(["push", "--folder", str(out), "--repo-id", "org/name"]) == 1
    assert "incomplete" in capsys.readouterr().err


def test_hf_missing_shard_and_wrong_tokenizer(sources, tmp_path, capsys, tiny_tokenizer_dir):
    src = shutil.copytree(sources["hf"], tmp_path / "hf")
    (src / "pytorch_model-00002-of-00003.bin").unlink()
    rc, _, err = convert_in_process(src, tmp_path / "out", capsys, fmt="hf-visualglm")
    assert rc == 1 and "lists pytorch_model-00002-of-00003.bin, which is missing" in err
    assert_nothing_left(tmp_path / "out")
    src2 = shutil.copytree(sources["hf"], tmp_path / "hf2")
    cfg = json.loads((src2 / "config.json").read_text())
    cfg["gmask_token_id"] += 1  # disagrees with the tokenizer
    (src2 / "config.json").write_text(json.dumps(cfg))
    rc, _, err = convert_in_process(src2, tmp_path / "out", capsys, fmt="hf-visualglm")
    assert rc == 1 and "gmask_token_id=" in err and "wrong tokenizer?" in err
    assert_nothing_left(tmp_path / "out")


def test_dtype_flag_casts_floating_tensors(sources, tiny_tokenizer_dir, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "bf16"
    rc, stdout, _ = convert_in_process(sources["hf"], out, capsys, "--dtype", "bfloat16", fmt="hf-visualglm")
    assert rc == 0 and "(bfloat16)" in stdout
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_incomplete_lora_pair_is_a_listed_error(sources, tiny_tokenizer_dir, tmp_path, capsys):
    """A LoRA ``matrix_A`` without its ``matrix_B`` (a damaged fine-tune save) is named; nothing is written.
    Complete pairs convert (tests/test_conversion_lora.py)."""
    def add_lora(sd):
        w = sd.pop("transformer.layers.0.attention.query_key_value.weight")
        sd["transformer.layers.0.attention.query_key_value.original.weight"] = w
        sd["transformer.layers.0.attention.query_key_value.matrix_A.0"] = torch.zeros(2, w.shape[1])

    src = copy_sat(sources["sat-blocked"], tmp_path / "src", edit=add_lora)
    rc, _, err = convert_in_process(src, tmp_path / "out", capsys, tokenizer=tiny_tokenizer_dir)
    assert rc == 1 and "transformer.layers.0.attention.query_key_value.matrix_B.0" in err, err
    assert_nothing_left(tmp_path / "out")
