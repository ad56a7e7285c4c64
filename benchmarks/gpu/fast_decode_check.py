"""GPU check of the fast decode path on the tiny trained models (fp32): graphs and compile give the plain
generate()'s tokens, and capturing raises nothing (a host sync inside the step would); the prefill is replayed from
its graph (prefill_graphs.py), also for a shorter prompt in the same bucket; answers that end on EOS at
different steps in a ragged batch, and a streamer, through the stop check read one step late (pinned copies and
CUDA events, decode_graphs.decode_loop), give the plain loop's tokens. Run on a GPU machine:

    PYTHONPATH=src python -m benchmarks.gpu.fast_decode_check
"""

import time

import torch
from transformers.generation.streamers import BaseStreamer

from modeling_visualglm.tools import shapes
from modeling_visualglm.tools.tiny_models import TRAINED_FAMILIES, load_trained


def kernels():
    """On CUDA in bf16: the fused rms_norm in CogVLM's order, single-query attention against SDPA (max abs diff)."""
    from modeling_visualglm.attention import single_query_attention
    from modeling_visualglm.llama import LlamaExpertRMSNorm

    gen = torch.Generator(device="cuda").manual_seed(0)
    norm = LlamaExpertRMSNorm(4096).cuda().bfloat16()
    x = torch.randn(1, 3, 4096, device="cuda", generator=gen).bfloat16()
    h = x.float()
    manual = (norm.weight.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))).bfloat16()
    print("rms_norm bf16 fused vs CogVLM order: max diff", (norm(x).float() - manual.float()).abs().max().item(),
          "equal", torch.equal(norm(x), manual), flush=True)
    q = torch.randn(1, 32, 1, 128, device="cuda", generator=gen).bfloat16()
    k, v = (torch.randn(1, 8, 2560, 128, device="cuda", generator=gen).bfloat16() for _ in range(2))
    mask = torch.arange(2560, device="cuda")[None, None, None] < 2400
    module = type("M", (), {"training": False, "config": type("C", (), {"_attn_implementation": "sdpa"})})()
    out = single_query_attention(module, q, k, v, mask, 128 ** -0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True).transpose(1, 2)
    print("single-query attention bf16 vs SDPA: max diff", (out.float() - ref.float()).abs().max().item(), flush=True)


def main():
    kernels()
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
            prefill = graph.prefill if graph is not None else None
            print(family, mode, f"{time.perf_counter() - t0:.2f}s", "captures", graph and graph.captures,
                  "replayed" if graph is not None and graph.graph is not None else "-",
                  "prefill graph" if prefill is not None and prefill.graph is not None else "eager prefill",
                  "same" if torch.equal(seq, out["off"]) else f"DIFFERENT {seq[0, ids.shape[1]:].tolist()}",
                  flush=True)
        answer, _ = model.chat(tok, image, "What colour is the shape?", do_sample=False)
        print(family, "chat (auto):", answer, flush=True)
        other_length(family, model, tok, image, ids.shape[1])
        early_stops(family, model, tok)


def other_length(family, model, tok, image, first_length):
    """A shorter prompt in the same bucket replays the prefill graph captured for the first one."""
    ids, pv, kw = model._chat_inputs(tok, image, "What colour?", [], {"do_sample": False})
    kw = {k: v for k, v in kw.items() if k in ("eos_token_id", "pad_token_id")}
    out = {mode: model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=16, min_new_tokens=16,
                                do_sample=False, fast_decode=mode, **kw) for mode in ("graphs", "off")}
    graph = model._fast_decoder.current
    print(family, f"prompt of {ids.shape[1]} tokens after {first_length}:",
          "same" if torch.equal(out["graphs"], out["off"]) else "DIFFERENT",
          "prefill captures", graph.prefill.captures if graph.prefill else None, flush=True)


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        pass


def early_stops(family, model, tok):
    """A ragged batch of three prompts whose answers end on EOS at different steps, and one streamed answer."""
    rows, pixels = [], []
    for i, question in enumerate(["What colour is the shape?", "Describe the picture.", "Where is it? Be brief."]):
        image = shapes.render(shapes.Scene(i % 6, i % 3, (4 * i) % 9, (1 << 29) + 101 * i))
        ids, pv, kw = model._chat_inputs(tok, image, question, [], {"do_sample": False})
        rows.append(ids[0].tolist())
        pixels.append(pv)
    kw = {k: v for k, v in kw.items() if k in ("eos_token_id", "pad_token_id", "logits_processor")}
    width = max(map(len, rows))
    pad = kw["pad_token_id"]
    batch = dict(input_ids=torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device),
                 attention_mask=torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                                             device=model.device),
                 pixel_values=torch.cat(pixels), **kw)
    out = {mode: model.generate(**batch, max_new_tokens=40, do_sample=False, fast_decode=mode)
           for mode in ("off", "graphs")}
    print(family, "ragged batch ending on EOS:", "same" if torch.equal(out["off"], out["graphs"]) else
          f"DIFFERENT {out['off'][:, width:].tolist()} vs {out['graphs'][:, width:].tolist()}",
          f"({out['off'].shape[1] - width} steps)", flush=True)
    single = {k: v[2:3] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}  # the third row alone
    streams = {mode: Collect() for mode in ("off", "graphs")}
    for mode, streamer in streams.items():
        model.generate(**single, max_new_tokens=40, do_sample=False, fast_decode=mode, streamer=streamer)
    print(family, "streamed:", "same" if streams["off"].chunks == streams["graphs"].chunks else
          f"DIFFERENT {streams['off'].chunks} vs {streams['graphs'].chunks}", flush=True)


if __name__ == "__main__":
    main()
