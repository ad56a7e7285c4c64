"""``visualglm-serve``: an OpenAI-compatible chat server for a modeling_visualglm hub folder (every family).

    visualglm-serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--allow-local-files]

Endpoints: ``POST /v1/chat/completions`` (text and ``image_url`` parts; ``stream: true`` as server-sent events in
OpenAI's ``chat.completion.chunk`` format), ``GET /v1/models``, ``GET /health``. A conversation is the family's
chat: earlier user/assistant turns become ``history``, the last user message is the query, and its picture (at
most ``--max-images``, one by default: these models see one picture per conversation) goes through the folder's
bounded image loader. ``temperature: 0`` is greedy; fields left out keep the family's chat defaults.

Built on FastAPI + uvicorn, not ``transformers serve`` (which cannot load remote-code classes, has no modality for
them, and cannot read ``data:`` images through our processors: docs/serving.md). Concurrent requests are batched by
``serving_engine.Engine`` (dynamic micro-batching into one ragged ``generate``).
"""


import argparse
import asyncio
import contextlib
import hmac
import json
import math
import os
import time
import uuid

from .serving import ImageError, add_model_arguments, load_image_source, load_model, missing_extra
from .serving_engine import Engine, EngineClosed, QueueFull

SAMPLING_FIELDS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "n", "stream")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.retry_after = status, message, type_, param, retry_after


def _error_body(err: ApiError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.status}}


# --- request → chat turn ----------------------------------------------------------------------------------------

def _text_and_images(content, where: str) -> tuple[str, list[str]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    texts, images = [], []
    for i, part in enumerate(content):
        if not isinstance(part, dict):
            raise ApiError(400, f"{where}.content[{i}] must be an object", param=f"{where}.content")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.content[{i}].text must be a string", param=f"{where}.content")
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ApiError(400, f"{where}.content[{i}].image_url.url must be a string", param=f"{where}.content")
            images.append(url)
        else:
            raise ApiError(400, f"{where}.content[{i}]: part type {kind!r} is not supported (text, image_url)",
                           param=f"{where}.content")
    return "\n".join(texts), images


def parse_messages(messages) -> tuple[str, list[tuple[str, str]], list[str]]:
    """OpenAI ``messages`` → (query, history pairs, image sources). System messages are not part of these
    families' prompt formats and are left out; turns must alternate user/assistant and end with a user turn."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    turns: list[tuple[str, str]] = []
    images: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", param="messages")
        role = message["role"]
        if role in ("system", "developer"):
            continue
        if role not in ("user", "assistant"):
            raise ApiError(400, f"messages[{i}]: role {role!r} is not supported (system, user, assistant)",
                           param="messages")
        text, found = _text_and_images(message.get("content"), f"messages[{i}]")
        if found and role != "user":
            raise ApiError(400, f"messages[{i}]: only user messages may carry images", param="messages")
        images += found
        if turns and turns[-1][0] == role:
            raise ApiError(400, f"messages[{i}]: user and assistant turns must alternate", param="messages")
        turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must come from the user", param="messages")
    if turns[0][0] != "user":
        raise ApiError(400, "the conversation must start with a user message", param="messages")
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
    return turns[-1][1], history, images


def sampling_from_request(body: dict, max_tokens_limit: int, defaults: dict) -> dict:
    """The request's sampling fields → ``chat`` keyword overrides (absent fields keep the family's defaults)."""
    # OpenAI's API has no minimum length: an answer ends where the model ends it (VisualGLM's chat default of
    # min_length=100 would force text past the end of a short answer)
    out: dict = {"min_length": 0}
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "n > 1 is not supported", param="n")
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise ApiError(400, "temperature must be a number in [0, 2]", param="temperature")
        if temperature == 0:
            out["do_sample"] = False
        else:
            out.update(do_sample=True, temperature=float(temperature))
    top_p = body.get("top_p")
    if top_p is not None:
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ApiError(400, "top_p must be a number in (0, 1]", param="top_p")
        out["top_p"] = float(top_p)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, "max_tokens must be a positive integer", param="max_tokens")
        if max_tokens > max_tokens_limit:
            raise ApiError(400, f"max_tokens={max_tokens} is above this server's limit of {max_tokens_limit}",
                           param="max_tokens")
        out["max_new_tokens"] = max_tokens
    else:
        out["max_new_tokens"] = min(int(defaults.get("max_new_tokens") or max_tokens_limit), max_tokens_limit)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
            raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
        out["stop_strings"] = list(defaults.get("stop_strings") or []) + stops
    return out


# --- the app ----------------------------------------------------------------------------------------------------

def create_app(model, tokenizer, *, model_name: str, api_key: str | None = None, allow_local_files: bool = False,
               max_images: int = 1, max_tokens_limit: int = 1024, max_body_bytes: int = 16 << 20,
               max_batch_size: int = 8, batch_window_ms: float = 10.0, max_queue: int = 64,
               queue_timeout_s: float = 60.0):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, batch_window_s=batch_window_ms / 1000,
                    max_queue=max_queue, queue_timeout_s=queue_timeout_s)
    defaults = model.chat_defaults_for(model.config)
    created = int(time.time())
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="visualglm-serve", lifespan=lifespan)
    app.state.engine = engine

    def error_response(err: ApiError) -> JSONResponse:
        headers = {}
        if err.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
        return JSONResponse(_error_body(err), status_code=err.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return error_response(err)

    def guard(request: Request) -> None:
        """The key and the declared body size of a /v1 request (a plain function, not an HTTP middleware:
        starlette's BaseHTTPMiddleware hides the client's disconnect from ``request.is_disconnected``)."""
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise ApiError(401, "invalid or missing API key", type_="authentication_error")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            raise ApiError(413, f"request body is larger than {max_body_bytes:,} bytes")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queued": engine.queued(), "running": len(engine.running)}

    @app.get("/v1/models")
    async def models(request: Request):
        guard(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "modeling_visualglm"}]}

    async def read_body(request: Request) -> dict:
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as read: Content-Length may be absent (chunked)
            size += len(chunk)
            if size > max_body_bytes:
                raise ApiError(413, f"request body is larger than {max_body_bytes:,} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"request body is not JSON: {err}") from err
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        guard(request)
        body = await read_body(request)
        if body.get("model") not in (None, model_name):
            raise ApiError(404, f"model {body.get('model')!r} is not served here; this server serves {model_name!r}",
                           param="model", type_="not_found_error")
        query, history, sources = parse_messages(body.get("messages"))
        if len(sources) > max_images:
            raise ApiError(400, f"{len(sources)} images in the conversation; this server takes at most {max_images}",
                           param="messages")
        overrides = sampling_from_request(body, max_tokens_limit, defaults)
        stream = bool(body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind, payload):  # called on the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        def prepare():
            image = None
            if sources:
                image = load_image_source(model, sources[0], allow_local_files=allow_local_files)
            return engine.prepare(image, query, history, overrides, emit)

        try:
            job = await run_in_threadpool(prepare)
        except ImageError as err:
            raise ApiError(400, f"image: {err}", param="messages") from err
        except (ValueError, TypeError) as err:  # the model's own checks on the query and history
            raise ApiError(400, str(err), param="messages") from err
        try:
            engine.submit(job)
        except QueueFull as err:
            raise ApiError(429, f"server busy: {err}", type_="rate_limit_error", retry_after=1) from err
        except EngineClosed as err:
            raise ApiError(503, str(err), type_="server_error", retry_after=5) from err

        rid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())

        def chunk(delta: dict, finish=None, usage=None) -> str:
            data = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def usage_of(done: dict) -> dict:
            return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                    "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}

        if stream:
            async def sse():
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    while True:
                        kind, payload = await events.get()
                        if kind == "delta":
                            yield chunk({"content": payload})
                        elif kind == "done":
                            yield chunk({}, finish=payload["finish_reason"])
                            if include_usage:
                                data = {"id": rid, "object": "chat.completion.chunk", "created": now,
                                        "model": model_name, "choices": [], "usage": usage_of(payload)}
                                yield f"data: {json.dumps(data)}\n\n"
                            yield "data: [DONE]\n\n"
                            return
                        else:
                            status, message = payload
                            yield f"data: {json.dumps({'error': {'message': message, 'code': status}})}\n\n"
                            return
                finally:
                    job.cancel()  # a client gone mid-stream (the generator is closed) frees its row

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        # non-streaming: wait for the answer, watching for the client going away
        text_parts = []
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "delta":
                    text_parts.append(payload)
                elif kind == "done":
                    return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                            "choices": [{"index": 0, "finish_reason": payload["finish_reason"],
                                         "message": {"role": "assistant", "content": payload["text"]},
                                         "logprobs": None}],
                            "usage": usage_of(payload)}
                else:
                    status, message = payload
                    raise ApiError(status, message, type_="server_error",
                                   retry_after=5 if status == 503 else None)
        finally:
            job.cancel()  # no-op once done; frees the slot if this handler is cancelled

    return app


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Serve ``app`` with uvicorn on a thread (port 0: a free one); yields the base URL ``http://host:port/v1``
    once the socket listens; stops the server and the engine on exit (tests, benchmarks, notebooks)."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
    thread = threading.Thread(target=server.run, name="visualglm-serve-http", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server did not start (see its log)")
            thread.join(0.01)
        bound = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://{host}:{bound}/v1"
    finally:
        server.should_exit = True
        thread.join(30)
        engine = getattr(app.state, "engine", None)
        if engine is not None:
            engine.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="visualglm-serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("VISUALGLM_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1/* (default: $VISUALGLM_API_KEY, else none)")
    ap.add_argument("--served-model-name", help="the model id clients send (default: the folder's name)")
    ap.add_argument("--allow-local-files", action="store_true",
                    help="accept image URLs that are local paths or file:// (off: only data: and http(s))")
    ap.add_argument("--max-images", type=int, default=1, help="pictures per conversation (default 1)")
    ap.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    ap.add_argument("--max-body-bytes", type=int, default=16 << 20, help="largest request body (default 16 MiB)")
    ap.add_argument("--max-batch-size", type=int, default=8, help="rows per generate call (default 8)")
    ap.add_argument("--batch-window-ms", type=float, default=10.0,
                    help="how long the first waiting request waits for others to share its batch (default 10)")
    ap.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default 64)")
    ap.add_argument("--queue-timeout", type=float, default=60.0,
                    help="seconds a request may wait for a slot before 503 (default 60)")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    if missing_extra("uvicorn", "visualglm-serve", "serve"):
        return 2
    import uvicorn

    model, tokenizer = load_model(args.model, args.device, args.dtype)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    app = create_app(model, tokenizer, model_name=name, api_key=args.api_key,
                     allow_local_files=args.allow_local_files, max_images=args.max_images,
                     max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
                     max_batch_size=args.max_batch_size, batch_window_ms=args.batch_window_ms,
                     max_queue=args.max_queue, queue_timeout_s=args.queue_timeout)
    print(f"visualglm-serve: {name} ({type(model).__name__}) on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
