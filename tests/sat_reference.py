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


def blip2_sat_classes():
    """THUDM/VisualGLM-6B @e314fb9 ``model/blip2.py``'s two SAT models, as (EVAViT, QFormer) classes: the ViTModel
    whose ``cls`` mixin is swapped for BLIP-2's ``ln_vision`` (``nn.LayerNorm(hidden)``, eps 1e-5, on all tokens),
    and the BaseModel with exact GELU, no position embeddings and an identity ``final_forward``. Skips the calling
    test without SAT."""
    import_sat()
    from sat.model import BaseMixin, BaseModel, ViTModel
    from torch import nn

    class LnVision(BaseMixin):
        def __init__(self, hidden_size):
            super().__init__()
            self.ln_vision = nn.LayerNorm(hidden_size)

        def final_forward(self, logits, **kw_args):
            return self.ln_vision(logits)

    class EVAViT(ViTModel):
        def __init__(self, args):
            super().__init__(args)
            self.del_mixin("cls")
            self.add_mixin("cls", LnVision(args.hidden_size))

    class QFormer(BaseModel):
        def __init__(self, args):
            super().__init__(args, activation_func=nn.functional.gelu)
            self.transformer.position_embeddings = None

        def final_forward(self, logits, **kw_args):
            return logits

        def position_embedding_forward(self, position_ids, **kw_args):
            return None

    return EVAViT, QFormer
