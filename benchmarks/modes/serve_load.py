"""serve_load: visualglm-serve under load on loopback: many concurrent openai clients vs the same requests one at a time.

One model folder (``--model``; default: the tiny trained model of ``--family`` when tools/trained has it, else
a tiny random hub folder written by tests/tiny_folders.py) is served in this process on 127.0.0.1 with
``visualglm-serve``'s app. The requests: ``--requests`` chat turns, each about its own picture rendered by
tools/shapes.py (sent as a ``data:`` URL) with one of the table's questions, every other one streamed, all greedy
(``temperature: 0``). They are sent

1. one at a time (the baseline), checking each answer against ``model.chat`` in-process (and, for a trained
   model, against the shapes table's answer);
2. by ``--clients`` concurrent clients (the official ``openai`` client, ``max_retries=0``): every answer must equal
   the baseline's, nothing may be lost or fail;
3. as a burst of ``--clients`` requests at a server whose queue holds ``--burst-queue``: the bound must refuse
   some (429 with Retry-After) and every other answer must still be right.

The record: p50/p95/p99 latency, requests/s and generated tokens/s of 1 and 2, the batches the engine ran, and the
refusals of 3. docs/serving.md shows the table.
"""

from __future__ import annotations

import base64
import io
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULTS = dict(family="minigpt4", clients=32, requests=320, max_tokens=16, max_batch_size=8, burst_queue=4)
SMOKE = dict(family="minigpt4", clients=32, requests=64, max_tokens=8, max_batch_size=8, burst_queue=4)
CPU_ONLY = False


def add_arguments(ap):
    ap.add_argument("--model", help="hub folder to serve (default: a tiny one of --family)")
    ap.add_argument("--family", help="tiny model family when --model is not given (visualglm, cogvlm, cogvlm2, "
                                     "minigpt4; default minigpt4)")
    ap.add_argument("--clients", type=int, help="concurrent clients (default 32)")
    ap.add_argument("--requests", type=int, help="requests in all (default 320)")
    ap.add_argument("--max-tokens", type=int, help="max_tokens per request (default 16)")
    ap.add_argument("--max-batch-size", type=int, help="the server's rows per generate (default 8)")
    ap.add_argument("--burst-queue", type=int, help="the queue bound of the burst phase (default 4)")


# --- requests ---------------------------------------------------------------------------------------------------

def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_requests(n: int, seed: int = 7, size: int = 112) -> list[dict]:
    """``n`` chat turns, each with its own shapes picture and a table question (English), every other streamed."""
    import random

    from modeling_visualglm.tools import shapes

    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = shapes.random_scene(rng)
        kind = shapes.KINDS[i % len(shapes.KINDS)]
        image = shapes.render(scene, size)
        out.append(dict(index=i, image=image, url=data_url(image), question=shapes.question(kind, "en"),
                        truth=shapes.answer(scene, kind, "en"), stream=i % 2 == 1))
    return out


def messages(req: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": req["url"]}},
                                         {"type": "text", "text": req["question"]}]}]


def send(client, model_name: str, req: dict, max_tokens: int) -> dict:
    """One request → {index, status, text, latency_s, tokens, retry_after}; status 200 or the HTTP error code."""
    import openai

    t0 = time.perf_counter()
    try:
        if req["stream"]:
            stream = client.chat.completions.create(model=model_name, messages=messages(req), temperature=0,
                                                    max_tokens=max_tokens, stream=True,
                                                    stream_options={"include_usage": True})
            parts, tokens = [], None
            for chunk in stream:
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    parts.append(choice.delta.content or "")
            text = "".join(parts)
        else:
            response = client.chat.completions.create(model=model_name, messages=messages(req), temperature=0,
                                                      max_tokens=max_tokens)
            text, tokens = response.choices[0].message.content, response.usage.completion_tokens
        return dict(index=req["index"], status=200, text=text, tokens=tokens, latency_s=time.perf_counter() - t0)
    except openai.APIStatusError as err:
        return dict(index=req["index"], status=err.status_code, text=None, tokens=0,
                    latency_s=time.perf_counter() - t0, retry_after=err.response.headers.get("retry-after"))


def run_clients(base_url: str, model_name: str, reqs: list[dict], clients: int, max_tokens: int,
                api_key: str = "none") -> tuple[list[dict], float]:
    """``reqs`` sent by ``clients`` threads (1: one at a time); returns (results in request order, wall seconds)."""
    import httpx
    import openai

    http = httpx.Client(limits=httpx.Limits(max_connections=clients + 4), timeout=600)
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, http_client=http)
    t0 = time.perf_counter()
    if clients == 1:
        results = [send(client, model_name, r, max_tokens) for r in reqs]
    else:
        start = threading.Barrier(clients)
        shares = [reqs[k::clients] for k in range(clients)]

        def worker(share):
            start.wait()
            return [send(client, model_name, r, max_tokens) for r in share]

        with ThreadPoolExecutor(clients) as pool:
            results = [r for part in pool.map(worker, shares) for r in part]
    wall = time.perf_counter() - t0
    http.close()
    return sorted(results, key=lambda r: r["index"]), wall


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    lat = [r["latency_s"] for r in ok]
    return dict(requests=len(results), ok=len(ok), wall_s=round(wall, 3),
                requests_per_s=round(len(ok) / wall, 2), tokens_per_s=round(sum(r["tokens"] or 0 for r in ok) / wall, 1),
                p50_s=round(percentile(lat, 50), 4) if lat else None, p95_s=round(percentile(lat, 95), 4) if lat else None,
                p99_s=round(percentile(lat, 99), 4) if lat else None, mean_s=round(statistics.fmean(lat), 4) if lat else None)


# --- the run ----------------------------------------------------------------------------------------------------

def tiny_folder(family: str, root: Path) -> tuple[Path, bool]:
    """(folder, trained): the tiny trained model of ``family`` when one is shipped, else a tiny random one."""
    try:
        from modeling_visualglm.tools.tiny_models import load_trained, trained_dir

        if (Path(str(trained_dir(family))) / "model.safetensors").is_file():
            from modeling_visualglm.tools.train_tiny import FAMILIES, write_hub

            model, tokenizer = load_trained(family)
            return write_hub(FAMILIES[family], model, tokenizer, root / family), True
    except (ImportError, ValueError):
        pass
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from tiny_folders import write_tiny_folder

    return write_tiny_folder(family, root / family), False


def load_test(folder: str, *, device: str = "cpu", clients: int = 32, requests: int = 64, max_tokens: int = 8,
              max_batch_size: int = 8, burst_queue: int = 4, check_truth: bool = False, log=print) -> dict:
    """The three phases on ``folder``; raises AssertionError naming what was lost or wrong."""
    import torch

    from modeling_visualglm.tools.serve import create_app, running_server
    from modeling_visualglm.tools.serving import load_model

    model, tokenizer = load_model(folder, device=device)
    reqs = make_requests(requests)
    name = "tiny"
    reference = {}
    for r in reqs:  # what model.chat answers, one at a time, in-process
        with torch.no_grad():
            reference[r["index"]] = model.chat(tokenizer, r["image"], r["question"], do_sample=False,
                                               max_new_tokens=max_tokens)[0]
    data: dict = dict(folder=str(folder), clients=clients, requests=requests, max_tokens=max_tokens,
                      max_batch_size=max_batch_size, trained=check_truth)
    app = create_app(model, tokenizer, model_name=name, max_batch_size=max_batch_size, max_queue=max(64, clients * 2))
    with running_server(app) as url:
        seq, seq_wall = run_clients(url, name, reqs, 1, max_tokens)
        conc, conc_wall = run_clients(url, name, reqs, clients, max_tokens)
        stats = dict(app.state.engine.stats)
    for phase, results in (("one at a time", seq), ("concurrent", conc)):
        failed = [r for r in results if r["status"] != 200]
        assert not failed, f"{phase}: {len(failed)} requests failed: {failed[:3]}"
        assert len(results) == requests, f"{phase}: {requests - len(results)} requests lost"
        wrong = [(r["index"], r["text"], reference[r["index"]]) for r in results if r["text"] != reference[r["index"]]]
        assert not wrong, f"{phase}: {len(wrong)} answers differ from model.chat: {wrong[:3]}"
    truth_rate = None
    if check_truth:
        right = sum(r["text"] == q["truth"] for r, q in zip(conc, reqs))
        truth_rate = right / requests
    data["one_at_a_time"] = summary(seq, seq_wall)
    data["concurrent"] = summary(conc, conc_wall)
    data["engine"] = stats
    data["truth_rate"] = truth_rate
    log(f"one at a time: {data['one_at_a_time']}")
    log(f"{clients} clients:  {data['concurrent']}  engine {stats}")

    # the burst: a small queue must refuse some requests, with Retry-After, and answer the rest right
    burst = reqs[:clients]
    app = create_app(model, tokenizer, model_name=name, max_batch_size=max_batch_size, max_queue=burst_queue)
    with running_server(app) as url:
        results, wall = run_clients(url, name, burst, clients, max_tokens)
    refused = [r for r in results if r["status"] == 429]
    answered = [r for r in results if r["status"] == 200]
    assert len(refused) + len(answered) == len(burst), [r for r in results if r["status"] not in (200, 429)][:3]
    assert refused, f"a burst of {clients} at a queue of {burst_queue} was not refused at all"
    assert all(r.get("retry_after") for r in refused), "429 without Retry-After"
    assert all(r["text"] == reference[r["index"]] for r in answered), "a burst answer differs from model.chat"
    data["burst"] = dict(sent=len(burst), queue=burst_queue, refused_429=len(refused), answered=len(answered))
    log(f"burst: {data['burst']}")
    return data


def run(args, device, record, save):
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder, trained = args.model, False
        else:
            folder, trained = tiny_folder(args.family, Path(tmp))
        torch_threads = None
        if device.type == "cpu":
            import torch

            torch_threads = torch.get_num_threads()
        record.data.update(load_test(str(folder), device=str(device), clients=args.clients, requests=args.requests,
                                     max_tokens=args.max_tokens, max_batch_size=args.max_batch_size,
                                     burst_queue=args.burst_queue, check_truth=trained))
        record.data["family"] = args.family if not args.model else None
        record.data["torch_threads"] = torch_threads
    save()
