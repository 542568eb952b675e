"""`mllm-sparse demo`: a Gradio chat with a LLaVA model that shows where its image tokens look.

    mllm-sparse demo --model runs/quickstart/stage2 --template chat_template
    mllm-sparse demo --model runs/stage2-merged --host 0.0.0.0 --port 7860

Upload an image and the page draws, over the picture the model sees (padded or cropped as its processor does),
the region each of the N image tokens stands for: a SparseFormer token's RoI at the layer the LLM reads (a ViT
patch, or a pooled cell, for the baselines). Ask questions in a multi-turn chat; answers stream in, with the time of
each stage (vision encode, LLM prefill, decode) and, optionally, the LLM's attention on each image token as it
starts to answer (the boxes it leans on fill in). Each browser session has its own conversation; one model serves
them in turn.

The page's events are also an API (`gradio_client`): `/image` (a file path) → the regions picture; `/send` (a
message, the chat so far, whether to show attention) → the chat, the picture and the timings, streamed; `/clear`.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mllm_sparse.images import denormalize, load_image
from mllm_sparse.visualize import draw_boxes

from .chat import ChatEngine, ChatReply
from .conversation import TEMPLATES
from .token_regions import answer_attention, image_token_regions

PICTURE_SIDE = 448  # the regions picture is drawn at least this large, so that small RoIs stay visible


@dataclass
class Conversation:
    """One browser session's chat: its image (None: text only) and its LLaVA turns so far."""

    image: Image.Image | None = None
    turns: list[dict[str, str]] = field(default_factory=list)


def regions_picture(engine: ChatEngine, image: Image.Image, weights: torch.Tensor | None = None) -> Image.Image:
    """The image as the model sees it, with the region of each image token drawn over it (filled by `weights`)."""
    image_processor = engine.processor.image_processor
    pixels = image_processor(images=[image], return_tensors="pt")["pixel_values"]
    regions = image_token_regions(engine.model, pixels)[0]
    seen = denormalize(pixels[0], image_processor.image_mean, image_processor.image_std)
    scale = max(1, -(-PICTURE_SIDE // max(seen.size)))
    seen = seen.resize((seen.width * scale, seen.height * scale), Image.Resampling.NEAREST)
    return draw_boxes(seen, regions, weights=weights)


def describe_timings(engine: ChatEngine, reply: ChatReply | None = None, image_share: float | None = None) -> str:
    """One line: the image tokens and each stage's time of `reply` (the answer just given)."""
    parts = [f"{engine.num_image_tokens} image tokens"]
    if reply is not None:
        t = reply.timings
        parts += [f"encode {1000 * t.encode_s:.1f} ms", f"prefill {1000 * t.prefill_s:.1f} ms"]
        parts += [f"decode {t.tokens_per_s:.0f} tokens/s" if t.tokens_per_s else f"decode {1000 * t.decode_s:.1f} ms"]
    if image_share is not None:
        parts.append(f"{100 * image_share:.0f}% of the first answer token's attention on the image")
    return " · ".join(parts)


class DemoSessions:
    """The demo's logic, free of Gradio: one `ChatEngine` shared by every session, a lock so that one session uses it
    at a time, and each session's `Conversation` kept by the caller.

    Args:
        engine: the model.
        **generate_kwargs: `generate` keywords for every answer (default `max_new_tokens=64`).
    """

    def __init__(self, engine: ChatEngine, **generate_kwargs):
        self.engine = engine
        self.generate_kwargs = {"max_new_tokens": 64, **generate_kwargs}
        self.lock = threading.Lock()

    def open_image(self, path: str | Path) -> tuple[Conversation, Image.Image]:
        """A new conversation about the image at `path`, and its regions picture."""
        image = load_image(path)
        with self.lock:
            return Conversation(image=image), regions_picture(self.engine, image)

    def ask(self, conversation: Conversation, message: str, attention: bool = False) -> Iterator[dict[str, Any]]:
        """Answer `message` in `conversation`, streamed: yields {"answer": text so far} before the first token and as
        tokens arrive, then once more with "done": True, the timings line and (with `attention`) the regions picture
        weighted by it. The conversation gains both turns once the answer is complete, and is left as it was if
        answering fails.

        The engine stays locked until the iterator is exhausted or closed (Gradio closes the ones it abandons); a
        caller that stops early must `close()` it, or other sessions wait.
        """
        message = message.strip()
        if not message:
            raise ValueError("Type a question first")
        engine = self.engine
        yield {"answer": "", "done": False}  # the question shows at once, also while another session holds the engine
        with self.lock:
            engine.conversation = [dict(t) for t in conversation.turns]
            engine.image = conversation.image if conversation.turns else None
            first_image = conversation.image if not conversation.turns else None
            answer = ""
            for piece in engine.stream(message, first_image, **self.generate_kwargs):
                answer += piece
                yield {"answer": answer, "done": False}
            reply = engine.last_reply
            turns = [dict(t) for t in engine.conversation]
            picture, share = None, None
            if attention and conversation.image is not None:
                record = engine.record()
                record["conversations"] = record["conversations"][:-1]  # up to the question just answered
                weights = answer_attention(engine, record, conversation.image)
                picture, share = regions_picture(engine, conversation.image, weights.per_token), weights.image_share
            conversation.turns = turns
            yield {
                "answer": reply.text,
                "done": True,
                "timings": describe_timings(engine, reply, share),
                "picture": picture,
            }


def build_app(sessions: DemoSessions, title: str = "mllm-sparse chat"):
    """The Gradio page (a `gr.Blocks`) over `sessions`."""
    import gradio as gr

    def on_image(path: str | None):
        if path is None:
            return None, [], Conversation(), ""
        try:
            conversation, picture = sessions.open_image(path)
        except Exception as err:  # shown on the page; the session keeps its previous state
            raise gr.Error(str(err)) from err
        return picture, [], conversation, describe_timings(sessions.engine)

    def on_send(message: str, history: list, conversation: Conversation, attention: bool):
        before = list(history or [])
        asked = before + [{"role": "user", "content": message}]
        try:
            for update in sessions.ask(conversation, message, attention):
                chat = asked + [{"role": "assistant", "content": update["answer"]}]
                if update["done"]:
                    picture = update["picture"] if update["picture"] is not None else gr.skip()
                    yield chat, "", conversation, picture, update["timings"]
                else:
                    yield chat, "", conversation, gr.skip(), gr.skip()
        except Exception as err:  # the chat goes back to what the model has as context; the question stays typed
            yield before, message, conversation, gr.skip(), gr.skip()
            raise gr.Error(str(err)) from err

    def on_clear(conversation: Conversation):
        return [], Conversation(image=conversation.image), ""

    with gr.Blocks(title=title) as app:
        gr.Markdown(
            f"## {title}\n{sessions.engine.num_image_tokens} image tokens per image. The boxes show the region each "
            "one stands for."
        )
        conversation = gr.State(Conversation())
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"])
                picture = gr.Image(type="pil", label="Where the image tokens look", interactive=False)
                attention = gr.Checkbox(label="Fill the boxes by the LLM's attention as it answers", value=True)
            with gr.Column(scale=1):
                chatbot = gr.Chatbot(label="Chat", height=420)
                message = gr.Textbox(label="Question", placeholder="Ask about the image, then press Enter")
                with gr.Row():
                    send = gr.Button("Send", variant="primary")
                    clear = gr.Button("New conversation")
                timings = gr.Markdown()
        image.change(on_image, [image], [picture, chatbot, conversation, timings], api_name="image")
        send_inputs = [message, chatbot, conversation, attention]
        send_outputs = [chatbot, message, conversation, picture, timings]
        send.click(on_send, send_inputs, send_outputs, api_name="send")
        message.submit(on_send, send_inputs, send_outputs, api_visibility="private")
        clear.click(on_clear, [conversation], [chatbot, conversation, timings], api_name="clear")
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm-sparse demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="a saved LLaVA folder (model + processor)")
    parser.add_argument("--template", choices=TEMPLATES, default="vicuna_v1", help="the template the model trained on")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public Gradio link (needs the internet)")
    parser.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", help="cast the model, e.g. bfloat16 (default: as saved)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    engine = ChatEngine.from_pretrained(args.model, template=args.template, device=args.device, dtype=args.dtype)
    app = build_app(DemoSessions(engine, max_new_tokens=args.max_new_tokens), title=f"mllm-sparse chat: {args.model}")
    app.queue().launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
