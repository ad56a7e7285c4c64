"""End to end for ``sat-cogvlm`` and ``hf-cogvlm``.

Tiny seeded random CogVLM (v1, 56 px: 4x4 patches) and CogVLM2 (112 px: 8x8 patches → 4x4 after the conv)
models are written in the original layouts by an inverse mapping written here from the spec's table
(../shared/specs/cogvlm.md §3.2), independently of the converter's rule tables:

- THUDM HF: ``model.*`` / ``model.vision.*`` names, per-layer ``rotary_emb.inv_freq``, ``config.json`` with
  ``vision_config`` (v2: ``num_multi_query_heads``); v1 as safetensors shards + index without a tokenizer,
  v2 as ``pytorch_model-*.bin`` shards + index with its tokenizer files;
- SAT: ``latest``, ``1/mp_rank_00_model_states.pt`` holding ``{'module': sd}``, ``model_config.json`` with
  ``eva_args``; the visual expert under ``mixins.rotary`` / ``mixins.mlp``, the ViT under ``mixins.eva.vit_model``.

Then ``python -m conversion.cli`` → ``visualglm-export check`` → logits in a fresh interpreter that cannot
import our packages must equal the in-process model's bit for bit (float32). Bad inputs fail with specific
messages, exit 1 and leave nothing at ``--out``; a v1 HF folder without ``--tokenizer`` is marked incomplete.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_checks_pass, edit_sat_copy, run_parallel
import torch
from safetensors.torch import save_file
from tiny_llama_tokenizer import SHAPE_TEXT, TOKENIZER_SHAPES, sentencepiece_ids, write_tokenizer_shape

from modeling_visualglm.image_processing_cogvlm import CogVLMImageProcessor
from modeling_visualglm.modeling_cogvlm import CogVLMForConditionalGeneration
from modeling_visualglm.processing_cogvlm import build_cogvlm_inputs, build_cogvlm_prompt
from modeling_visualglm.tools.tiny_models import demo_image_path, randomize_, tiny_cogvlm_tokenized_config

from modeling_visualglm.conversion.cli import main as convert_main
from test_conversion_visualglm import assert_nothing_left, convert_in_process as visualglm_convert_in_process
from modeling_visualglm.hub_export.check import blocker_source, check_folder
from modeling_visualglm.hub_export.code import import_closure
from modeling_visualglm.hub_export.families import package_dir
from modeling_visualglm.hub_export.writer import INCOMPLETE_MARKER

PY = sys.executable
THREADS = torch.get_num_threads()
VERSIONS = ("cogvlm", "cogvlm2")


# --- models ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_llama_tokenizer import make_tiny_llama_tokenizer

    path = tmp_path_factory.mktemp("llama_tokenizer")
    make_tiny_llama_tokenizer(path)
    for extra in ("spm.model", "spm.vocab"):  # training leftovers, not tokenizer files
        (path / extra).unlink(missing_ok=True)
    return path


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def models(tokenizer):
    out = {}
    for seed, version in enumerate(VERSIONS):
        torch.manual_seed(seed)
        model = CogVLMForConditionalGeneration(tiny_cogvlm_tokenized_config(tokenizer, version)).eval()
        out[version] = randomize_(model, seed=10 + seed)
    return out


@pytest.fixture(scope="module")
def inputs(models, tokenizer):
    return cogvlm_inputs(models, tokenizer)


def cogvlm_inputs(models, tokenizer) -> dict:
    """Per version: the ids of one image prompt and the demo picture's pixels, as the processor makes them."""
    res = {}
    for version, model in models.items():
        cfg = model.config
        ids = build_cogvlm_inputs(tokenizer, build_cogvlm_prompt("what is this?"), True, cfg.num_image_tokens,
                                  cfg.image_token_id)
        pixels = CogVLMImageProcessor(size=cfg.vision_config.image_size)(demo_image_path(), return_tensors="pt")
        res[version] = {"input_ids": torch.tensor([ids]), "pixel_values": pixels["pixel_values"]}
    return res


# --- inverse mappings: our names → the original layouts (spec cogvlm.md §3.2) ---------------------------

HF_VISION_LAYER = {"mlp.dense_h_to_4h": "mlp.fc1", "mlp.dense_4h_to_h": "mlp.fc2"}
HF_VISION_EMB = {
    "cls_embedding": "patch_embedding.cls_embedding",
    "position_embedding": "patch_embedding.position_embedding.weight",
    "patch_embedding.weight": "patch_embedding.proj.weight",
    "patch_embedding.bias": "patch_embedding.proj.bias",
}


def _vision_layer_suffix(rest: str, table: dict) -> str:
    layer, _, tail = rest.partition(".")  # "M", "mlp.dense_h_to_4h.weight"
    for ours, theirs in table.items():
        if tail.startswith(ours + "."):
            tail = theirs + tail[len(ours):]
    return f"{layer}.{tail}"


def to_hf(model) -> dict:
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        if name.startswith("language_model."):
            out["model." + name[len("language_model."):]] = t
        elif name == "lm_head.weight":
            out[name] = t
        elif name.startswith("vision_model.embeddings."):
            out["model.vision." + HF_VISION_EMB[name[len("vision_model.embeddings."):]]] = t
        elif name.startswith("vision_model.layers."):
            rest = _vision_layer_suffix(name[len("vision_model.layers."):], HF_VISION_LAYER)
            out["model.vision.transformer.layers." + rest] = t
        elif name.startswith("adapter."):
            rest = name[len("adapter."):]
            top = rest in ("boi", "eoi") or rest.startswith("conv.")
            out["model.vision." + ("" if top else "linear_proj.") + rest] = t
        else:
            raise AssertionError(f"no HF name for {name}")
    hd = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    for i in range(model.config.text_config.num_hidden_layers):  # THUDM's rotary buffer, saved per layer
        out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, hd, 2) / hd))
    return out


SAT_LAYER = {  # our suffix inside language_model.layers.N → (SAT template)
    "input_layernorm.weight": "transformer.layers.{}.input_layernorm.weight",
    "post_attention_layernorm.weight": "transformer.layers.{}.post_attention_layernorm.weight",
    "self_attn.language_expert_query_key_value.weight": "transformer.layers.{}.attention.query_key_value.weight",
    "self_attn.language_expert_dense.weight": "transformer.layers.{}.attention.dense.weight",
    "self_attn.vision_expert_query_key_value.weight": "mixins.rotary.vision_query_key_value_list.{}.weight",
    "self_attn.vision_expert_query_key_value.bias": "mixins.rotary.vision_query_key_value_list.{}.bias",
    "self_attn.vision_expert_dense.weight": "mixins.rotary.vision_dense_list.{}.weight",
    "mlp.language_mlp.gate_proj.weight": "mixins.mlp.gate_proj.{}.weight",
    "mlp.language_mlp.up_proj.weight": "transformer.layers.{}.mlp.dense_h_to_4h.weight",
    "mlp.language_mlp.down_proj.weight": "transformer.layers.{}.mlp.dense_4h_to_h.weight",
    "mlp.vision_mlp.gate_proj.weight": "mixins.mlp.vision_gate_proj.{}.weight",
    "mlp.vision_mlp.up_proj.weight": "mixins.mlp.vision_dense_h_to_4h_list.{}.weight",
    "mlp.vision_mlp.down_proj.weight": "mixins.mlp.vision_dense_4h_to_h_list.{}.weight",
}
SAT_VIT_EMB = {
    "cls_embedding": "transformer.word_embeddings.weight",
    "position_embedding": "transformer.position_embeddings.weight",
    "patch_embedding.weight": "mixins.patch_embedding.proj.weight",
    "patch_embedding.bias": "mixins.patch_embedding.proj.bias",
}


def to_sat(model) -> dict:
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        if name.startswith("language_model.layers."):
            layer, _, tail = name[len("language_model.layers."):].partition(".")
            out[SAT_LAYER[tail].format(layer)] = t
        elif name == "language_model.embed_tokens.weight":
            out["transformer.word_embeddings.weight"] = t
        elif name == "language_model.norm.weight":
            out["transformer.final_layernorm.weight"] = t
        elif name == "lm_head.weight":
            out["mixins.lm.lm_head.weight"] = t
        elif name.startswith("vision_model.embeddings."):
            out["mixins.eva.vit_model." + SAT_VIT_EMB[name[len("vision_model.embeddings."):]]] = t
        elif name.startswith("vision_model.layers."):
            out["mixins.eva.vit_model.transformer.layers." + name[len("vision_model.layers."):]] = t
        elif name.startswith("adapter."):
            rest = name[len("adapter."):]
            top = rest in ("boi", "eoi") or rest.startswith("conv.")
            out["mixins.eva." + ("" if top else "linear_proj.") + rest] = t
        else:
            raise AssertionError(f"no SAT name for {name}")
    out["mixins.rotary.rotary_emb.inv_freq"] = torch.arange(4.0)
    return out


def hf_config_json(cfg) -> dict:
    v, t = cfg.vision_config, cfg.text_config
    data = dict(
        architectures=["CogVLMForCausalLM"], model_type="cogvlm" if cfg.version == "cogvlm" else "cogvlm2",
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings, hidden_act="silu",
        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
        template_version="chat", torch_dtype="float32",
        vision_config=dict(
            dropout_prob=0.0, hidden_act="gelu", in_channels=3, num_hidden_layers=v.num_hidden_layers,
            hidden_size=v.hidden_size, patch_size=v.patch_size, num_heads=v.num_attention_heads,
            intermediate_size=v.intermediate_size, layer_norm_eps=v.layer_norm_eps,
            num_positions=(v.image_size // v.patch_size) ** 2 + 1, image_size=v.image_size,
        ),
    )
    if cfg.version == "cogvlm2":
        data["num_multi_query_heads"] = t.num_key_value_heads
    return data


def sat_config_json(cfg) -> dict:
    v, t = cfg.vision_config, cfg.text_config
    grid = v.image_size // v.patch_size
    data = dict(
        model_class="CogVLMModel", tokenizer_type="vicuna-7b-v1.5", num_layers=t.num_hidden_layers,
        hidden_size=t.hidden_size, num_attention_heads=t.num_attention_heads, vocab_size=t.vocab_size,
        layernorm_order="pre", model_parallel_size=1, max_sequence_length=t.max_position_embeddings,
        use_bias=False, inner_hidden_size=t.intermediate_size, image_length=grid * grid,
        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
        eva_args=dict(
            num_layers=v.num_hidden_layers, hidden_size=v.hidden_size, num_attention_heads=v.num_attention_heads,
            vocab_size=1, layernorm_order="post", max_sequence_length=grid * grid + 1,
            inner_hidden_size=v.intermediate_size, use_final_layernorm=False, layernorm_epsilon=v.layer_norm_eps,
            row_parallel_linear_final_bias=False, image_size=[v.image_size, v.image_size], pre_len=1, post_len=0,
            in_channels=3, patch_size=v.patch_size,
        ),
    )
    if cfg.version == "cogvlm2":
        data["num_multi_query_heads"] = t.num_key_value_heads
    return data


def write_hf(folder: Path, model, safetensors: bool, tok_dir: Path | None) -> Path:
    folder.mkdir(parents=True)
    sd = to_hf(model)
    keys = list(sd)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    ext, index = ("safetensors", "model.safetensors.index.json") if safetensors else ("bin", "pytorch_model.bin.index.json")
    stem = "model" if safetensors else "pytorch_model"
    weight_map = {}
    for n, names in enumerate(shards, 1):
        fname = f"{stem}-{n:05d}-of-{len(shards):05d}.{ext}"
        part = {k: sd[k].contiguous() for k in names}
        save_file(part, str(folder / fname)) if safetensors else torch.save(part, folder / fname)
        weight_map.update({k: fname for k in names})
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(hf_config_json(model.config), indent=2))
    if tok_dir is not None:  # CogVLM2 folders ship their tokenizer
        for f in tok_dir.iterdir():
            shutil.copy(f, folder / f.name)
    return folder


def write_sat(folder: Path, model) -> Path:
    (folder / "1").mkdir(parents=True)
    (folder / "latest").write_text("1")
    torch.save({"module": to_sat(model)}, folder / "1" / "mp_rank_00_model_states.pt")
    (folder / "model_config.json").write_text(json.dumps(sat_config_json(model.config), indent=2))
    return folder


# --- sources and conversions (subprocess, as users run them) -------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory, models, tok_dir):
    base = tmp_path_factory.mktemp("sources")
    return {
        "hf-cogvlm": write_hf(base / "hf-v1", models["cogvlm"], safetensors=True, tok_dir=None),
        "hf-cogvlm2": write_hf(base / "hf-v2", models["cogvlm2"], safetensors=False, tok_dir=tok_dir),
        "sat-cogvlm": write_sat(base / "sat-v1", models["cogvlm"]),
        "sat-cogvlm2": write_sat(base / "sat-v2", models["cogvlm2"]),
    }


SUBPROCESS = ("hf-cogvlm", "sat-cogvlm2")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, sources, tok_dir):
    base = tmp_path_factory.mktemp("hub")
    commands = {}
    for name, src in sources.items():
        fmt = name.rsplit("-", 1)[0] + "-cogvlm"
        cmd = ["-m", "modeling_visualglm.conversion.cli", "--format", fmt, "--src", src, "--out", base / name, "--no-progress"]
        if name != "hf-cogvlm2":  # v2 HF finds its own tokenizer in --src
            cmd += ["--tokenizer", tok_dir]
        commands[name] = cmd
    # one v1 and one v2 conversion as users run them (console entry in a subprocess); the other two through
    # the same entry point in this process, which saves two interpreter start-ups
    procs = run_parallel({k: c for k, c in commands.items() if k in SUBPROCESS})
    for name, cmd in commands.items():
        if name not in SUBPROCESS:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = convert_main([str(c) for c in cmd[2:]])
            procs[name] = subprocess.CompletedProcess(cmd, rc, out.getvalue(), err.getvalue())
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: {proc.stdout}\n{proc.stderr}"
    return {name: (base / name, proc) for name, proc in procs.items()}


def ref_version(name: str) -> str:
    return "cogvlm2" if name.endswith("2") else "cogvlm"


# --- the happy path -------------------------------------------------------------------------------------

def test_folders_are_complete_with_cogvlm_code_only(converted, tokenizer):
    expected_code = {p.name for p in import_closure(package_dir(), [
        "modeling_cogvlm", "configuration_cogvlm", "processing_cogvlm", "image_processing_cogvlm"])}
    assert {"llama.py", "eva_vit.py", "modeling_cogvlm.py"} <= expected_code
    for name, (out, proc) in converted.items():
        version = ref_version(name)
        assert "every model key produced once" in proc.stdout, name
        assert "rotary" in proc.stdout and "dropped" in proc.stdout  # inv_freq dropped with its reason
        files = {p.name for p in out.iterdir()}
        assert {f for f in files if f.endswith(".py")} == expected_code, name
        assert {"config.json", "generation_config.json", "README.md", "tokenizer.json", "tokenizer_config.json",
                "processor_config.json"} <= files and INCOMPLETE_MARKER not in files
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["version"] == version and cfg["image_token_id"] == len(tokenizer)
        assert cfg["text_config"]["rope_theta"] == (500000.0 if version == "cogvlm2" else 10000.0)
        assert cfg["text_config"]["num_key_value_heads"] == (2 if version == "cogvlm2" else 8)
        assert cfg["text_config"]["vision_qkv_bias"] is (version == "cogvlm2")
        assert cfg["auto_map"] == {
            "AutoConfig": "configuration_cogvlm.CogVLMConfig",
            "AutoModel": "modeling_cogvlm.CogVLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForConditionalGeneration",
            "AutoModelForImageTextToText": "modeling_cogvlm.CogVLMForConditionalGeneration",
            "AutoProcessor": "processing_cogvlm.CogVLMProcessor",
            "AutoImageProcessor": "image_processing_cogvlm.CogVLMImageProcessor",
        }
        tok = json.loads((out / "tokenizer_config.json").read_text())
        assert "AutoTokenizer" not in tok.get("auto_map", {})  # a stock transformers tokenizer
        proc_cfg = json.loads((out / "processor_config.json").read_text())
        assert proc_cfg["image_processor"]["auto_map"]["AutoImageProcessor"] == \
            "image_processing_cogvlm.CogVLMImageProcessor"
        gen = json.loads((out / "generation_config.json").read_text())
        gen.pop("transformers_version")
        # neutral (CONTRACTS §2): the demos' greedy 2048 new tokens live in CHAT_DEFAULTS, used by chat
        assert gen == {"max_new_tokens": 256, "bos_token_id": tokenizer.bos_token_id,
                       "eos_token_id": tokenizer.eos_token_id, "pad_token_id": gen["pad_token_id"]}


def test_check_passes_on_converted_folders(converted):
    # one folder per version and layout; the other two are loaded in a fresh interpreter by the logits test
    assert_checks_pass({name: converted[name][0] for name in ("hf-cogvlm", "sat-cogvlm2")},
                       "processor: CogVLMProcessor")


LOGITS_CHILD = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from transformers import AutoModelForCausalLM
inputs = torch.load(sys.argv[2])
results = {}
for spec in sys.argv[4:]:
    name, version, folder = spec.split("=", 2)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        results[name] = model(**inputs[version]).logits
torch.save(results, sys.argv[3])
"""


def test_fresh_interpreter_logits_are_bit_identical(converted, models, inputs, tmp_path):
    torch.save(inputs, tmp_path / "inputs.pt")
    specs = [f"{name}={ref_version(name)}={out}" for name, (out, _) in converted.items()]
    proc = subprocess.run([PY, "-I", "-c", blocker_source() + LOGITS_CHILD, str(THREADS), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "logits.pt"), *specs], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    logits = torch.load(tmp_path / "logits.pt")
    for name in converted:
        version = ref_version(name)
        with torch.no_grad():
            ref = models[version](**inputs[version]).logits
        assert ref.abs().max() > 0 and logits[name].shape == ref.shape
        assert torch.equal(logits[name], ref), f"{name}: max diff {(logits[name] - ref).abs().max()}"


# --- bad input ------------------------------------------------------------------------------------------

def convert_in_process(fmt, src, out, capsys, tokenizer=None):
    return visualglm_convert_in_process(src, out, capsys, fmt=fmt, tokenizer=tokenizer)


def edit_hf_v2(src: Path, dst: Path, edit) -> Path:
    """Apply ``edit`` to the merged state dict and write it back as one ``pytorch_model.bin``."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "pytorch_model.bin.index.json").read_text())
    sd = {}
    for shard in sorted(set(index["weight_map"].values())):
        sd.update(torch.load(dst / shard, weights_only=True))
        (dst / shard).unlink()
    (dst / "pytorch_model.bin.index.json").unlink()
    edit(sd)
    torch.save(sd, dst / "pytorch_model.bin")
    return dst


def _reshape(key):
    return lambda sd: sd.__setitem__(key, torch.zeros(sd[key].shape[0] + 1, *sd[key].shape[1:]))


BAD = {
    "sat missing key": ("sat-cogvlm", edit_sat_copy, lambda sd: sd.pop("mixins.mlp.vision_gate_proj.1.weight"),
                        "missing: 'language_model.layers.1.mlp.vision_mlp.gate_proj.weight' [96, 64] needs source "
                        "tensor 'mixins.mlp.vision_gate_proj.1.weight'"),
    "sat extra key": ("sat-cogvlm", edit_sat_copy,
                      lambda sd: sd.__setitem__("mixins.eva.vit_model.transformer.layers.0.attention.rel_pos", torch.zeros(3)),
                      "unexpected source tensor 'mixins.eva.vit_model.transformer.layers.0.attention.rel_pos' [3]"),
    "sat wrong shape": ("sat-cogvlm2", edit_sat_copy, _reshape("mixins.eva.boi"),
                        "wrong shape: 'adapter.boi' would be [2, 1, 64]"),
    "hf missing conv bias": ("hf-cogvlm2", edit_hf_v2, lambda sd: sd.pop("model.vision.conv.bias"),
                             "missing: 'adapter.conv.bias' [32] needs source tensor 'model.vision.conv.bias'"),
    "hf language qkv bias": ("hf-cogvlm2", edit_hf_v2,
                             lambda sd: sd.__setitem__("model.layers.0.self_attn.language_expert_query_key_value.bias",
                                                       torch.zeros(96)),
                             "'language_model.layers.0.self_attn.language_expert_query_key_value.bias': "
                             "CogVLMForConditionalGeneration has no such parameter"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tensors_are_reported(case, sources, tok_dir, tmp_path, capsys):
    name, editor, edit, message = BAD[case]
    src = editor(sources[name], tmp_path / "src", edit)
    fmt = name.rsplit("-", 1)[0] + "-cogvlm"
    rc, _, err = convert_in_process(fmt, src, tmp_path / "out", capsys, tokenizer=tok_dir)
    assert rc == 1
    assert "conversion failed" in err and "(1 problem)" in err and message in err, err
    assert_nothing_left(tmp_path / "out")


def test_bad_configs_are_reported(sources, tok_dir, tmp_path, capsys):
    src = shutil.copytree(sources["hf-cogvlm"], tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["vision_config"]["num_positions"] = 99
    (src / "config.json").write_text(json.dumps(cfg))
    rc, _, err = convert_in_process("hf-cogvlm", src, tmp_path / "out", capsys, tokenizer=tok_dir)
    assert rc == 1 and "99 positions but a 56 px image with patch 14 has 4x4 patches + CLS = 17" in err
    assert_nothing_left(tmp_path / "out")
    # a v2 checkpoint (it has the conv) whose config lost the grouped-query head count
    src2 = shutil.copytree(sources["sat-cogvlm2"], tmp_path / "src2")
    cfg = json.loads((src2 / "model_config.json").read_text())
    del cfg["num_multi_query_heads"]
    (src2 / "model_config.json").write_text(json.dumps(cfg))
    rc, _, err = convert_in_process("sat-cogvlm", src2, tmp_path / "out", capsys, tokenizer=tok_dir)
    assert rc == 1 and "no num_multi_query_heads" in err
    assert_nothing_left(tmp_path / "out")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    from tiny_llama_tokenizer import make_tiny_llama_tokenizer

    folder = tmp_path_factory.mktemp("vicuna_spm")
    make_tiny_llama_tokenizer(folder)
    return folder / "spm.model"


@pytest.mark.parametrize("shape", TOKENIZER_SHAPES)
def test_tokenizer_folder_shapes(shape, spm_model, sources, tmp_path, capsys):
    """--tokenizer with a Vicuna folder as users have it (FastChat's: tokenizer.model + tokenizer_config.json
    only; tokenizer.json only; both): the converted folder's tokenizer gives SentencePiece's ids, BOS first."""
    from transformers import AutoTokenizer

    tok_dir = write_tokenizer_shape(spm_model, tmp_path / "vicuna", shape)
    rc, _, err = convert_in_process("hf-cogvlm", sources["hf-cogvlm"], tmp_path / "out", capsys, tokenizer=tok_dir)
    assert rc == 0, err
    assert AutoTokenizer.from_pretrained(tmp_path / "out").encode(SHAPE_TEXT) == sentencepiece_ids(spm_model)


def test_v1_hf_without_tokenizer_is_incomplete(sources, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, _ = convert_in_process("hf-cogvlm", sources["hf-cogvlm"], out, capsys)
    assert rc == 0 and "INCOMPLETE (no tokenizer)" in stdout and "--tokenizer" in stdout
    files = {p.name for p in out.iterdir()}
    assert {INCOMPLETE_MARKER, "config.json", "modeling_cogvlm.py", "model.safetensors"} <= files
    assert "tokenizer_config.json" not in files and "processor_config.json" not in files
    assert "Vicuna-7B-v1.5" in (out / INCOMPLETE_MARKER).read_text()
    assert "Incomplete folder" in (out / "README.md").read_text()
    assert check_folder(out) == 1
    assert "INCOMPLETE" in capsys.readouterr().err
