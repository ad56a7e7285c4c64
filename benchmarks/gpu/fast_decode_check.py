"""GPU check of the fast decode path on the tiny trained models (fp32): graphs and compile give the plain
generate()'s tokens, and capturing raises nothing (a host sync inside the step would). Run on a GPU machine:

    PYTHONPATH=src python -m benchmarks.gpu.fast_decode_check
"""

import time

import torch

from modeling_visualglm.tools import shapes
from modeling_visualglm.tools.tiny_models import TRAINED_FAMILIES, load_trained


def main():
    for family in TRAINED_FAMILIES:
        model, tok = load_trained(family)
        model = model.cuda().eval()
        image = shapes.render(shapes.Scene(1, 2, 4, 12345))
        ids, pv, kw = model._chat_inputs(tok, image, "What colour is the shape?", [], {"do_sample": False})
        kw = {k: v for k, v in kw.items() if k in ("eos_token_id", "pad_token_id", "logits_processor")}
        out = {}
        for mode in ("off", "graphs", "compile", "graphs"):
            t0 = time.perf_counter()
            seq = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=24, min_new_tokens=24,
                                 do_sample=False, fast_decode=mode, **kw)
            torch.cuda.synchronize()
            out.setdefault(mode, seq)
            graph = model._fast_decoder.current if model._fast_decoder else None
            print(family, mode, f"{time.perf_counter() - t0:.2f}s", "captures", graph and graph.captures,
                  "replayed" if graph is not None and graph.graph is not None else "-",
                  "same" if torch.equal(seq, out["off"]) else f"DIFFERENT {seq[0, ids.shape[1]:].tolist()}",
                  flush=True)
        answer, _ = model.chat(tok, image, "What colour is the shape?", do_sample=False)
        print(family, "chat (auto):", answer, flush=True)


if __name__ == "__main__":
    main()
