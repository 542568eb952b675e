"""What `mllm-sparse demo` does: a Gradio chat with a LLaVA model that shows where its image tokens look.

    mllm-sparse demo --model runs/quickstart/stage2
    mllm-sparse demo --model runs/stage2-merged --host 0.0.0.0 --port 7860

Upload an image and the page draws, over the picture the model sees (padded or cropped as its processor does), the
region each of the N image tokens stands for: a SparseFormer token's RoI at the layer the LLM reads (a ViT patch, a
pooled cell, or a VisionZip patch or merged group, for the baselines). Ask questions in a multi-turn chat; answers
stream in, with the time of each stage (vision encode, LLM prefill, decode) and, optionally, the LLM's attention on each
image token as it starts to answer (the boxes it leans on fill in). Each browser session has its own conversation; one
model serves them in turn. A model whose tower is elastic (`mllm_sparse.elastic`) serves several token budgets: the page
then offers them, and choosing one encodes the image again at it (the regions and the timings change).

What a visitor can cost is bounded: uploads over `--max-upload-mb` are refused by Gradio as they arrive, images over
`--max-image-megapixels` before they are decoded; a session keeps only the model input picture (S × S), never the
upload, and its state is freed when its page closes or after `--session-ttl-minutes` idle; at most `--max-sessions`
sessions are kept. A bad upload gets one line naming the file, not the server's folder.

The page's events are also an API (`gradio_client`): `/image` (a file path) → the regions picture; `/send` (a
message, the chat so far, whether to show attention) → the chat, the question box, the picture and the timings,
streamed; `/budget` (a token budget) → the picture and the timings line at it; `/clear`. A refused input (not an
image, an empty question, an ended conversation) is a validation error naming it; an answer that fails (the model
errs, or the conversation outgrows the LLM) is a warning on the page, and `/send` returns the chat as it was with the
question still in its box.
"""

from __future__ import annotations

import logging
import threading
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr  # at module level: Gradio resolves the handlers' `gr.Request` annotations in these globals
from PIL import Image, UnidentifiedImageError

from llava_adapter.chat import ChatEngine, ChatReply
from llava_adapter.token_regions import answer_attention, model_input, regions_picture
from mllm_sparse.images import ImageLoadError, load_image

LOG = logging.getLogger(__name__)
# JPEGs decode (by DCT scaling) at no less than twice the model input side: cheap, and the processor's own resize
# still makes the final reduction.
JPEG_DRAFT_FACTOR = 2
SHOWN_SIDE = 512  # the regions picture: the upload at this size, not the (often 112-336 px) model input upscaled
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_MEGAPIXELS = 50.0
PIL_MAX_MEGAPIXELS = Image.MAX_IMAGE_PIXELS / 1e6  # load_image refuses larger images as decompression bombs
DEFAULT_SESSION_TTL_MINUTES = 60.0
DEFAULT_MAX_SESSIONS = 1000  # sessions whose state Gradio keeps; each holds its model input, a 512-px picture, its chat
SESSION_ENDED = (
    "This conversation has ended (its page closed, or it sat idle past the time limit); upload the image again or "
    "start a new conversation"
)


@dataclass
class Conversation:
    """One browser session's chat: its image and its LLaVA turns so far.

    Attributes:
        image: the model input as a picture (S × S, what the processor makes of the upload; the processor maps it to
            the same pixels again), never the upload itself; None: text only.
        turns: the LLaVA turns so far.
        ended: its session ended and its image and turns were freed; it cannot be continued.
        num_latent_tokens: the token budget its image is encoded at (one the engine's tower serves); None: the
            model's default.
        shown: the upload as the model sees it (same padding or crop) at `SHOWN_SIDE`, for the regions picture.
    """

    image: Image.Image | None = None
    turns: list[dict[str, str]] = field(default_factory=list)
    ended: bool = False
    num_latent_tokens: int | None = None
    shown: Image.Image | None = None


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
    at a time, and each session's `Conversation` kept by the caller (Gradio's session state), indexed here by session
    so that a session's end can free it.

    Args:
        engine: the model.
        max_pixels: images with more pixels are refused before they are decoded.
        **generate_kwargs: `generate` keywords for every answer (default `max_new_tokens=64`).
    """

    def __init__(self, engine: ChatEngine, max_pixels: int = int(DEFAULT_MAX_MEGAPIXELS * 1e6), **generate_kwargs):
        if not 0 < max_pixels <= Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"max_pixels must be in (0, {Image.MAX_IMAGE_PIXELS}] (PIL's limit), got {max_pixels}")
        self.engine = engine
        self.max_pixels = max_pixels
        self.generate_kwargs = {"max_new_tokens": 64, **generate_kwargs}
        self.lock = threading.Lock()
        # Weak: the session state owns each conversation; one Gradio drops (evicted, expired) leaves this index too.
        self.conversations: weakref.WeakValueDictionary[str, Conversation] = weakref.WeakValueDictionary()
        self._index_lock = threading.Lock()  # not `lock`: freeing a session must not wait for an answer
        # S, measured rather than read from the processor's settings, which differ between its pad / crop / resize modes
        self.input_side = max(model_input(engine, Image.new("RGB", (1, 1)))[0].shape[-2:])

    def read_image(self, path: str | Path) -> Image.Image:
        """The image at `path` as RGB; JPEGs decoded at reduced scale, never below twice the model input side (nor
        `SHOWN_SIDE`).

        Raises:
            ImageLoadError: not an image PIL can read, or more than `max_pixels` (checked on the header, before
                decoding); the message names the file by its name only, not its folder (a server's upload folder).
        """
        name = Path(path).name
        limit = f"this demo takes images of up to {self.max_pixels / 1e6:g} megapixels"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
                with Image.open(path) as header:
                    width, height = header.size
        except Image.DecompressionBombError as err:
            raise ImageLoadError(f"{name} is larger than {PIL_MAX_MEGAPIXELS:.0f} megapixels; {limit}") from err
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ImageLoadError(f"{name} is not an image PIL can read") from err
        if width * height > self.max_pixels:
            raise ImageLoadError(f"{name} is {width}×{height} ({width * height / 1e6:.1f} megapixels); {limit}")
        try:
            return load_image(path, draft_size=max(JPEG_DRAFT_FACTOR * self.input_side, SHOWN_SIDE))
        except (ImageLoadError, OSError) as err:
            raise ImageLoadError(f"{name} is not an image PIL can read") from err

    def open_image(
        self, path: str | Path, session: str | None = None, num_latent_tokens: int | None = None
    ) -> tuple[Conversation, Image.Image]:
        """A new conversation about the image at `path` (of `session`, if given) at budget `num_latent_tokens`
        (None: the model's default), and its regions picture. The conversation keeps only the model input (S × S);
        the upload is dropped once converted."""
        upload = self.read_image(path)
        seen = model_input(self.engine, upload)[1]  # the processor alone: no need to hold the engine
        shown = model_input(self.engine, upload, SHOWN_SIDE)[1]
        conversation = Conversation(image=seen, num_latent_tokens=num_latent_tokens, shown=shown)
        with self.lock:
            self.engine.num_latent_tokens = num_latent_tokens  # an unserved budget: ValueError naming the served
            picture = regions_picture(self.engine, seen, shown=shown)
        if session is not None:
            self.track(session, conversation)
        return conversation, picture

    def set_budget(self, conversation: Conversation, num_latent_tokens: int) -> tuple[Image.Image | None, str]:
        """Encode `conversation`'s image at budget `num_latent_tokens` from its next answer on; returns its regions
        picture at that budget (None without an image) and the timings line's token count."""
        if conversation.ended:
            raise ValueError(SESSION_ENDED)
        with self.lock:
            self.engine.num_latent_tokens = num_latent_tokens
            conversation.num_latent_tokens = self.engine.num_latent_tokens
            picture = (
                None
                if conversation.image is None
                else regions_picture(self.engine, conversation.image, shown=conversation.shown)
            )
            return picture, describe_timings(self.engine)

    def track(self, session: str, conversation: Conversation) -> None:
        """Note that `conversation` is `session`'s, so that `end_session` can free it."""
        with self._index_lock:
            self.conversations[session] = conversation

    def release(self, conversation: Conversation) -> None:
        """Free `conversation`'s image and turns for good (its session ended or expired)."""
        conversation.image, conversation.shown, conversation.turns, conversation.ended = None, None, [], True
        with self._index_lock:
            for session, kept in list(self.conversations.items()):
                if kept is conversation:
                    del self.conversations[session]

    def end_session(self, session: str) -> None:
        """Free the conversation of `session`, if it has one (its page closed)."""
        with self._index_lock:
            conversation = self.conversations.get(session)
        if conversation is not None:
            self.release(conversation)

    def ask(self, conversation: Conversation, message: str, attention: bool = False) -> Iterator[dict[str, Any]]:
        """Answer `message` in `conversation`, streamed: yields {"answer": text so far} before the first token and as
        tokens arrive, then once more with "done": True, the timings line and (with `attention`) the regions picture
        weighted by it. The conversation gains both turns once the answer is complete, and is left as it was if
        answering fails.

        The engine stays locked until the iterator is exhausted or closed (Gradio closes the ones it abandons); a
        caller that stops early must `close()` it, or other sessions wait.
        """
        if conversation.ended:
            raise ValueError(SESSION_ENDED)
        message = message.strip()
        if not message:
            raise ValueError("Type a question first")
        engine = self.engine
        yield {"answer": "", "done": False}  # the question shows at once, also while another session holds the engine
        with self.lock:
            engine.num_latent_tokens = conversation.num_latent_tokens
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
                picture = regions_picture(engine, conversation.image, weights.per_token, shown=conversation.shown)
                share = weights.image_share
            if not conversation.ended:  # a session that ended meanwhile stays freed
                conversation.turns = turns
            yield {
                "answer": reply.text,
                "done": True,
                "timings": describe_timings(engine, reply, share),
                "picture": picture,
            }


def session_ended(history: list | None, conversation: Conversation) -> bool:
    """Whether the page shows a chat whose conversation has been freed (its page closed, it expired, or Gradio dropped
    its state: the page still has turns the session does not)."""
    return conversation.ended or bool(history and not conversation.turns)


def build_app(
    sessions: DemoSessions,
    title: str = "mllm-sparse chat",
    session_ttl_s: int = round(60 * DEFAULT_SESSION_TTL_MINUTES),
):
    """The Gradio page (a `gr.Blocks`) over `sessions`.

    A session's conversation is freed when its page closes (Gradio's `unload`) or once it has been idle (no upload,
    no question) for `session_ttl_s` seconds (its `State`'s time to live); uploads and pictures are deleted from
    Gradio's cache after as long. A user's mistake (a bad upload, an empty question, an ended conversation, a budget
    the model does not serve) is refused at its input by a validator, as one line without a traceback in the server's
    log; an event that fails anyway (the model errs, the conversation outgrows the LLM) shows a warning, its traceback
    logged only when the model erred. No event raises, so no "Error" badge is left on the page.
    """
    if session_ttl_s < 1:
        raise ValueError(f"session_ttl_s must be at least 1, got {session_ttl_s}")

    # A visitor's mistake is shown by a validator, at the input it concerns: an exception in the event itself would
    # also leave an "Error" badge on every output of the event.
    def check_image(upload: dict | None, budget: int | None):
        problem = ""
        if upload is not None:
            try:
                if upload.get("path") is None:
                    raise ImageLoadError("The upload is not an image file")
                sessions.read_image(upload["path"])  # decoded again by the event: JPEGs at reduced scale, cheap
            except ImageLoadError as err:
                problem = str(err)
        return [gr.validate(not problem, problem), budget_validation(budget)]

    def budget_validation(budget: int | None):  # /image skips Gradio's preprocessing, which checks the Radio's value
        served = sessions.engine.budgets
        return gr.validate(budget is None or budget in served, f"{budget} image tokens: this model serves {served}")

    def warn(err: Exception, doing: str) -> None:
        """Show `err` as a toast: raised, it would leave an "Error" badge on every output of the event."""
        if isinstance(err, ValueError):  # the visitor's input or the conversation's own limit: one line
            gr.Warning(str(err))
        else:  # not the visitor's doing (a bug, out of memory): the log gets the traceback
            LOG.exception("the model failed to %s", doing)
            gr.Warning(f"The model failed to {doing} ({type(err).__name__}: {err}); the server's log has details")

    def check_send(message: str, history: list, conversation: Conversation, attention: bool):
        if session_ended(history, conversation):
            problem = SESSION_ENDED
        else:
            problem = "" if message and message.strip() else "Type a question first"
        return [gr.validate(not problem, problem), *[gr.validate(True, "")] * 3]

    def on_image(upload: dict | None, budget: int | None, request: gr.Request):
        # Gradio's preprocessing is off for this event (it decodes the file with PIL and reports failures with the
        # server's path); the upload has been checked to be in Gradio's cache all the same.
        if upload is None:
            return None, [], Conversation(num_latent_tokens=budget), ""
        try:  # checked by `check_image`; what fails now (the model, or the file gone meanwhile) is a warning
            conversation, picture = sessions.open_image(upload["path"], request.session_hash, budget)
        except Exception as err:  # the session keeps its previous state
            warn(err, "encode the image")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return picture, [], conversation, describe_timings(sessions.engine)

    def on_send(message: str, history: list, conversation: Conversation, attention: bool, request: gr.Request):
        before = list(history or [])
        if session_ended(before, conversation):  # ended after `check_send` passed
            warn(ValueError(SESSION_ENDED), "answer")
            yield before, message, conversation, gr.skip(), gr.skip()
            return
        sessions.track(request.session_hash, conversation)
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
            warn(err, "answer")
            yield before, message, conversation, gr.skip(), gr.skip()

    def on_budget(budget: int, conversation: Conversation, request: gr.Request):
        if conversation.ended:
            conversation = Conversation(num_latent_tokens=budget)
        try:
            picture, line = sessions.set_budget(conversation, budget)
        except Exception as err:
            warn(err, "encode the image at this budget")
            return gr.skip(), gr.skip(), gr.skip()
        sessions.track(request.session_hash, conversation)
        return (picture if picture is not None else gr.skip()), conversation, line

    def on_clear(conversation: Conversation, request: gr.Request):
        if conversation.ended:
            conversation = Conversation()
        conversation.turns = []
        sessions.track(request.session_hash, conversation)
        return [], conversation, ""

    def on_unload(request: gr.Request):
        sessions.end_session(request.session_hash)

    ttl = int(session_ttl_s)
    engine = sessions.engine
    elastic = len(engine.budgets) > 1
    tokens = (
        f"One model, {len(engine.budgets)} token budgets ({', '.join(map(str, engine.budgets))} image tokens per "
        "image): pick one below."
        if elastic
        else f"{engine.num_image_tokens} image tokens per image."
    )
    with gr.Blocks(title=title, delete_cache=(min(ttl, 600), ttl)) as app:
        gr.Markdown(f"## {title}\n{tokens} The boxes show the region each one stands for.")
        conversation = gr.State(Conversation(), time_to_live=ttl, delete_callback=sessions.release)
        with gr.Row():  # the chat first: on a phone the columns stack, and the conversation is what a visitor reads
            with gr.Column(scale=1):
                chatbot = gr.Chatbot(label="Chat", height=360, elem_id="chat")
                message = gr.Textbox(label="Question", placeholder="Ask about the image, then press Enter")
                with gr.Row():
                    send = gr.Button("Send", variant="primary")
                    clear = gr.Button("New conversation")
                timings = gr.Markdown(elem_id="timings")
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"])
                budget = gr.Radio(
                    engine.budgets,
                    value=engine.num_latent_tokens,
                    label="Image tokens (the image is encoded again at the budget chosen)",
                    visible=elastic,
                )
                picture = gr.Image(
                    type="pil", label="Where the image tokens look", interactive=False, elem_id="regions"
                )
                attention = gr.Checkbox(label="Fill the boxes by the LLM's attention as it answers", value=True)
        image_outputs = [picture, chatbot, conversation, timings]
        image.change(
            on_image, [image, budget], image_outputs, api_name="image", preprocess=False, validator=check_image
        )
        budget.change(  # the Radio refuses a budget outside its choices before the event runs
            on_budget, [budget, conversation], [picture, conversation, timings], api_name="budget"
        )
        send_inputs = [message, chatbot, conversation, attention]
        send_outputs = [chatbot, message, conversation, picture, timings]
        send.click(on_send, send_inputs, send_outputs, api_name="send", validator=check_send)
        message.submit(on_send, send_inputs, send_outputs, api_visibility="private", validator=check_send)
        clear.click(on_clear, [conversation], [chatbot, conversation, timings], api_name="clear")
        app.unload(on_unload)
    return app


def launch(
    app,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    block: bool = True,
) -> None:
    """Serve `app`; Gradio refuses uploads over `max_upload_mb` MiB while they stream in (nothing is stored) and keeps
    the state of at most `max_sessions` sessions (the oldest are dropped). `block=False` returns once serving."""
    app.queue().launch(
        server_name=host,
        server_port=port,
        share=share,
        show_error=True,
        max_file_size=int(max_upload_mb * 2**20),
        state_session_capacity=max_sessions,
        prevent_thread_lock=not block,
    )


@dataclass
class DemoSettings:
    """What `mllm-sparse demo` does: one field per option of the command.

    Attributes:
        model: a saved LLaVA folder (model + processor).
        template: the conversation template (`conversation.TEMPLATES`); None: the one the model folder records.
        num_latent_tokens: the token budget the page starts at (an elastic tower serves several); None: the model's
            default.
        max_new_tokens: answer length limit.
        host: the address to serve on ("0.0.0.0" serves other machines).
        port: the port to serve on.
        share: also open a public Gradio link (needs the internet).
        device: "cuda", "cpu", "cuda:1", ...; None: cuda if available.
        dtype: cast the model, e.g. "bfloat16"; None: as saved.
        max_upload_mb: larger uploads are refused as they stream in (MiB).
        max_image_megapixels: larger images are refused before they are decoded (at most PIL's limit).
        session_ttl_minutes: a conversation idle this long is freed, as one whose page closes.
        max_sessions: sessions kept at once; the oldest are dropped.
    """

    model: Path
    template: str | None = None
    num_latent_tokens: int | None = None
    max_new_tokens: int = 64
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    device: str | None = None
    dtype: str | None = None
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_image_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    session_ttl_minutes: float = DEFAULT_SESSION_TTL_MINUTES
    max_sessions: int = DEFAULT_MAX_SESSIONS


def check_settings(settings: DemoSettings) -> None:
    """Raise `ValueError` naming the option when a setting is out of range (before the model loads)."""
    if settings.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be positive, got {settings.max_new_tokens}")
    if not 0 < settings.max_image_megapixels <= PIL_MAX_MEGAPIXELS:
        raise ValueError(
            f"--max-image-megapixels must be in (0, {PIL_MAX_MEGAPIXELS:.0f}], got {settings.max_image_megapixels}"
        )
    if settings.session_ttl_minutes * 60 < 1:
        raise ValueError(f"--session-ttl-minutes must be at least 1/60, got {settings.session_ttl_minutes}")
    if settings.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {settings.max_upload_mb}")
    if settings.max_sessions < 1:
        raise ValueError(f"--max-sessions must be positive, got {settings.max_sessions}")


def run(settings: DemoSettings, block: bool = True):
    """Load the model and serve the chat page; with `block` (the command's way) this returns only when the server
    stops. Returns the Gradio app (`block=False`: once it serves, to be closed by the caller)."""
    check_settings(settings)
    engine = ChatEngine.from_pretrained(
        settings.model,
        template=settings.template,
        device=settings.device,
        dtype=settings.dtype,
        num_latent_tokens=settings.num_latent_tokens,
    )
    sessions = DemoSessions(
        engine, max_pixels=int(settings.max_image_megapixels * 1e6), max_new_tokens=settings.max_new_tokens
    )
    app = build_app(sessions, f"mllm-sparse chat: {settings.model}", round(60 * settings.session_ttl_minutes))
    launch(app, settings.host, settings.port, settings.share, settings.max_upload_mb, settings.max_sessions, block)
    return app
