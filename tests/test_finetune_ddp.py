"""visualglm-finetune on 2 processes (torchrun, gloo on CPU) trains exactly like 1 process at the same global batch
(issue 16): the logged losses and the updated adapter weights agree. Slow: two training runs in fresh interpreters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def _run(cmd, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _losses(out):
    with open(out / "checkpoint-2" / "trainer_state.json") as f:
        return [entry["loss"] for entry in json.load(f)["log_history"] if "loss" in entry]


def test_two_processes_equal_one_at_the_same_global_batch(tmp_path):
    from safetensors.torch import load_file
    from tiny_folders import write_tiny_folder

    folder = write_tiny_folder("cogvlm2", tmp_path / "cogvlm2")
    (tmp_path / "imgs").mkdir()
    with open(tmp_path / "chat.jsonl", "w") as f:
        for name, rgb in COLOURS.items():
            Image.new("RGB", (64, 64), rgb).save(tmp_path / "imgs" / f"{name}.png")
            # answers of different lengths: a per-process mean of means would weigh tokens unequally
            answer = f"It is {name}" + ", surely" * len(name)
            f.write(json.dumps({"messages": [{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": "Colour?"}]},
                                             {"role": "assistant", "content": answer}],
                                "images": [f"imgs/{name}.png"]}) + "\n")
    common = ["-m", "modeling_visualglm.tools.finetune", "--model", str(folder), "--data", str(tmp_path / "chat.jsonl"),
              "--data-format", "jsonl", "--max-steps", "2", "--save-steps", "2", "--lr", "1e-2", "--warmup", "0",
              "--lora-dropout", "0", "--logging-steps", "1", "--no-progress", "--seed", "7"]
    _run([sys.executable, *common, "--output-dir", str(tmp_path / "one"), "--batch-size", "2"], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common,
          "--output-dir", str(tmp_path / "two"), "--batch-size", "1"], tmp_path)

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 2
    assert one == pytest.approx(two, rel=1e-4)
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # the two steps did update the adapter
