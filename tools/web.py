"""``visualglm-web``: a gradio web demo for a modeling_visualglm hub folder (every family).

    visualglm-web --model DIR [--host 127.0.0.1] [--port 7860] [--share] [--device ...] [--dtype ...]

Upload a picture, ask, watch the answer stream (``model.stream_chat``); "Clear" starts over; the sliders start at
the family's chat defaults (``CHAT_DEFAULTS``). A new picture starts a new conversation, as in VisualGLM-6B's
``web_demo.py`` and MiniGPT-4's demo. One answer is generated at a time (gradio's queue, concurrency 1).
"""

from __future__ import annotations

import argparse

from .serving import add_model_arguments, chat_defaults, load_model, missing_extra


def build_demo(model, tokenizer, title: str | None = None):
    import gradio as gr

    defaults = chat_defaults(model)
    family = type(model).__name__.removesuffix("ForConditionalGeneration")

    def respond(image, query, chat, history, do_sample, temperature, top_p, max_new_tokens):
        query = (query or "").strip()
        if not query:
            yield chat, history, ""
            return
        kwargs = dict(do_sample=bool(do_sample), max_new_tokens=int(max_new_tokens))
        if do_sample:
            kwargs.update(temperature=float(temperature), top_p=float(top_p))
        chat = list(chat or []) + [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
        try:
            for response, new_history in model.stream_chat(tokenizer, image, query, history or [], **kwargs):
                chat[-1] = {"role": "assistant", "content": response}
                yield chat, history, ""
        except (ValueError, TypeError) as err:
            raise gr.Error(str(err))
        yield chat, new_history, ""

    def new_picture(image):
        return [], []  # a new picture, a new conversation

    with gr.Blocks(title=title or f"visualglm-web: {family}") as demo:
        gr.Markdown(f"## {title or family}\nUpload a picture, ask about it. A new picture starts a new conversation.")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(type="pil", label="Picture", elem_id="picture")
                with gr.Accordion("Sampling (the family's defaults)", open=False):
                    do_sample = gr.Checkbox(value=bool(defaults.get("do_sample", False)), label="sample",
                                            elem_id="do_sample")
                    temperature = gr.Slider(0.05, 2.0, value=float(defaults.get("temperature") or 1.0), step=0.05,
                                            label="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=float(defaults.get("top_p") or 1.0), step=0.05, label="top_p")
                    max_new_tokens = gr.Slider(1, 2048, value=int(defaults.get("max_new_tokens") or 512), step=1,
                                               label="max new tokens", elem_id="max_new_tokens")
            with gr.Column(scale=3):
                chat = gr.Chatbot(label="Chat", elem_id="chat", height=420)
                query = gr.Textbox(label="Question", placeholder="Ask about the picture, Enter to send",
                                   elem_id="query")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Clear", elem_id="clear")
        inputs = [image, query, chat, history, do_sample, temperature, top_p, max_new_tokens]
        send.click(respond, inputs, [chat, history, query], concurrency_limit=1)
        query.submit(respond, inputs, [chat, history, query], concurrency_limit=1)
        clear.click(lambda: ([], [], None), None, [chat, history, image])
        image.upload(new_picture, image, [chat, history])
    return demo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="visualglm-web", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="a public gradio.live link (off by default)")
    args = ap.parse_args(argv)
    if missing_extra("gradio", "visualglm-web", "web"):
        return 2
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    demo = build_demo(model, tokenizer)
    print(f"visualglm-web: {type(model).__name__} from {args.model} on http://{args.host}:{args.port}", flush=True)
    demo.queue(max_size=32).launch(server_name=args.host, server_port=args.port, share=args.share,
                                   show_error=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
