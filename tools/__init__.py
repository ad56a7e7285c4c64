"""Tooling that is not remote code: the demo, tiny model presets and tokenizers (installed as
``modeling_visualglm.tools``; never copied into a hub folder)."""
