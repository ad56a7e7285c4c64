"""Import SwissArmyTransformer (PyPI ``swissarmytransformer`` 0.4.12) on a CPU-only machine.

SAT imports ``triton`` at module load for kernels the CPU reference paths never call (ChatGLM, ViT,
EVA2-CLIP). We import torch's compiler stack first (so torch decides "no triton" on its own), then put
a stub ``triton`` in ``sys.modules`` only while SAT imports, and remove it afterwards.
"""

import importlib
import sys
import types

import pytest


def _triton_stub():
    triton = types.ModuleType("triton")
    language = types.ModuleType("triton.language")

    def _decorator(*args, **kwargs):
        if args and callable(args[0]) and len(args) == 1 and not kwargs:
            return args[0]
        return lambda fn: fn

    class constexpr:  # noqa: N801 - mirrors triton.language.constexpr
        pass

    def _unavailable(*args, **kwargs):
        raise RuntimeError("triton stub: GPU kernels are not available in the CPU reference")

    triton.jit = triton.autotune = triton.heuristics = _decorator
    triton.Config = lambda *a, **k: None
    triton.cdiv = lambda a, b: -(-a // b)
    triton.language = language
    language.constexpr = constexpr
    language.__getattr__ = lambda name: _unavailable
    return {"triton": triton, "triton.language": language}


def import_sat():
    """Return the ``sat`` package, or skip the calling test if it is not installed."""
    if "sat" in sys.modules:
        return sys.modules["sat"]
    if importlib.util.find_spec("sat") is None:
        pytest.skip("swissarmytransformer is not installed (pip install --no-deps swissarmytransformer==0.4.12)")
    import torch._dynamo  # noqa: F401  - settle torch's own triton detection before the stub exists
    import transformers.activations  # noqa: F401

    stub = _triton_stub()
    saved = {k: sys.modules.get(k) for k in stub}
    sys.modules.update(stub)
    try:
        sat = importlib.import_module("sat")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return sat
