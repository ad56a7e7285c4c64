"""The README's main job: ``visualglm-demo`` runs every stage on the embedded tiny model."""

import subprocess
import sys


def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "modeling_visualglm.tools.demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "max |logits(original) - logits(converted)| = 0" in proc.stdout
    assert "demo finished: every stage worked" in proc.stdout
    for name in ("sat-visualglm/latest", "sat-visualglm/1/mp_rank_00_model_states.pt",
                 "visualglm-tiny-hf/config.json", "visualglm-tiny-hf/modeling_visualglm.py"):
        assert (out / name).is_file(), name


def test_demo_refuses_a_non_empty_out(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    proc = subprocess.run([sys.executable, "-m", "modeling_visualglm.tools.demo", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "precious"
