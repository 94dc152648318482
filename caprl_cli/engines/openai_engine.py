"""Caption through an OpenAI-compatible server (typically an existing `vllm serve` of a CapRL model).

The model runs elsewhere; this engine only sends requests, so it needs no GPU and runs in the caprl
process itself. What it guarantees, like the offline engines:

- **The same prompt.** The chat endpoint renders the model's chat template on the server, and
  Qwen2.5-VL's stock template then puts "You are a helpful assistant." in front of a conversation
  without a system turn: a prompt CapRL was not trained with. A vLLM server is therefore sent a
  per-request `chat_template` that renders exactly the prompt the offline engines feed (the profile's
  `prompt_text`), so prompt token counts match the offline engines image for image. vLLM refuses request templates unless started with
  `--trust-request-chat-template`; that is checked before any image is sent. Other servers get plain
  messages, and the provenance records what was sent (`prompt_sent`).
- **The same pixels.** Images arrive resized to the model's grid, so the server resizes nothing as
  long as its own pixel bounds (the checkpoint's, unless `vllm serve --mm-processor-kwargs` changed
  them) hold --min-pixels..--max-pixels; vLLM refuses per-request processor settings unless started
  with --trust-request-mm-kwargs, so none are sent. They are sent as PNG (lossless)
  unless the original was a JPEG, which is sent as a quality-95 JPEG: pixels that were JPEG-compressed
  once lose nothing worth keeping, and the request is several times smaller than a PNG of them.
- **The same seeds.** Each request carries `seed = request_seed(run seed, key, caption index)`.
- **Bounded concurrency.** `--concurrency` requests are in flight at once, on daemon threads (a
  stopped run never waits for an answer it will drop).
- **Transient is not permanent.** 408/425/429/5xx answers, timeouts, refused or reset connections are
  retried `--retries` times with growing pauses; a request still failing becomes an `unavailable` row
  that the next plain run tries again. Any other error answer (a 400 about this one image) is an
  `engine` row.

Not used here: --dtype, --gpu-memory-utilization, --max-model-len and --batch-size (the server has
its own), and loop detection (`--max-repeats`): a caption is judged only once the server returns it.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from caprl_cli.engines.base import Caption, Engine, EngineSpec, ImageRequest, ServerSpec, combine_captions
from caprl_cli.engines.feeding import Ended, Feeder
from caprl_cli.engines.openai_client import ServerClient, ServerResponseError
from caprl_cli.engines.seeding import request_seed
from caprl_cli.errors import EngineStartError, UsageError
from caprl_cli.inputs.retry import backoff_delays, is_transient
from caprl_cli.storage import redact

log = logging.getLogger("caprl")

JPEG_QUALITY = 95
REQUEST_TIMEOUT_S = 600.0  # one caption of up to --max-tokens on a busy server
START_TIMEOUT_S = 30.0  # the checks before the first image
_INPUT_WAIT_S = 0.1
_RESULT_WAIT_S = 0.25
# What vLLM says when it refuses a request's chat template.
_UNTRUSTED_TEMPLATE = "trust-request-chat-template"


def encode_image(request: ImageRequest) -> tuple[str, bytes]:
    """The image as sent: (`image/png` or `image/jpeg`, bytes). See the module doc for the rule."""
    buffer = io.BytesIO()
    image = request.image if request.image.mode == "RGB" else request.image.convert("RGB")
    if request.lossy_source:
        image.save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling=0)
        return "image/jpeg", buffer.getvalue()
    image.save(buffer, "PNG", compress_level=1)  # speed over size: it crosses a network once
    return "image/png", buffer.getvalue()


def data_url(request: ImageRequest) -> str:
    """The image as a `data:` URL for an `image_url` content part."""
    mime, data = encode_image(request)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def literal_template(text: str) -> str:
    """A Jinja chat template that renders exactly `text`, whatever the messages."""
    if "endraw" not in text:
        return "{% raw %}" + text + "{% endraw %}"
    return "{{ " + json.dumps(text) + " }}"


def caption_messages(prompt: str, system_prompt: str | None, image_url: str) -> list[dict[str, Any]]:
    """The chat messages of one image: CapRL's single user turn (image, then the instruction), with a
    system turn only when one was asked for."""
    messages: list[dict[str, Any]] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append(
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": prompt}],
        }
    )
    return messages


def find_served_model(served: list[dict[str, Any]], model: str) -> str | None:
    """The id to request for `model`: the entry whose id or root is exactly `model` (or, for a local
    model folder, names the same folder); None when the server serves no such model."""
    for entry in served:
        if model in (entry.get("id"), entry.get("root")):
            return str(entry["id"])
    folder = Path(model).expanduser()
    if folder.is_dir():
        wanted = folder.resolve()
        for entry in served:
            for name in (entry.get("id"), entry.get("root")):
                if isinstance(name, str) and name.startswith(("/", "~", ".")) and Path(name).expanduser().resolve() == wanted:
                    return str(entry["id"])
    return None


def served_models(client: ServerClient, base_url: str) -> list[dict[str, Any]]:
    """The server's `GET /models` entries (each has an `id`, and from vLLM the `root` it loaded)."""
    where = redact(base_url)
    try:
        listing = client.get("/models", timeout=START_TIMEOUT_S)
    except ServerResponseError as exc:
        raise EngineStartError(f"the server at {where} did not list its models (GET /models): {exc}") from None
    except OSError as exc:
        raise EngineStartError(f"cannot reach the server at {where}: {exc}") from None
    return [entry for entry in (listing or {}).get("data", []) if isinstance(entry, dict) and "id" in entry]


def served_entry(client: ServerClient, base_url: str, model: str) -> dict[str, Any]:
    """The listing entry `--model` names (its id, its root, or the same local folder); a server that
    serves no such model is a usage error naming what it does serve."""
    served = served_models(client, base_url)
    model_id = find_served_model(served, model)
    if model_id is None:
        names = ", ".join(sorted({str(entry["id"]) for entry in served})) or "nothing"
        raise UsageError(
            f"the server at {redact(base_url)} serves {names}, not {model}: pass --model with the name it serves "
            "(or start vllm serve with --served-model-name)"
        )
    return next(entry for entry in served if entry["id"] == model_id)


@dataclass(frozen=True)
class ServerFacts:
    """What the start-up checks learned about the server."""

    model_id: str  # the id requests name
    software: str | None  # "vllm 0.32.0", or None when the server does not say
    is_vllm: bool


@dataclass
class _Image:
    """One image's requests: its payload (encoded once) and its captions as they come back."""

    request: ImageRequest
    count: int
    captions: list[Caption | None] = field(default_factory=list)
    _url: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self) -> str:
        with self._lock:
            if self._url is None:
                self._url = data_url(self.request)
            return self._url

    def done(self, index: int, caption: Caption) -> Caption | None:
        """Record caption `index`; the image's result once all are in."""
        if not self.captions:
            self.captions = [None] * self.count
        self.captions[index] = caption
        if any(caption is None for caption in self.captions):
            return None
        self._url = None
        return combine_captions([caption for caption in self.captions if caption is not None])


class OpenAIEngine(Engine):
    """CapRL captioning through an OpenAI-compatible chat completions endpoint."""

    name = "openai"

    def __init__(self, spec: EngineSpec) -> None:
        if spec.server is None:
            raise UsageError("--engine openai needs --base-url")
        self.spec = spec
        self.server: ServerSpec = spec.server
        self.client = ServerClient(self.server.base_url, api_key_of(self.server.api_key_env), REQUEST_TIMEOUT_S)
        self.facts = check_server(self.client, self.server, spec)
        self.retried = 0  # requests sent again after a transient failure
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        template = literal_template(spec.prompt_text) if self.facts.is_vllm else None
        self._extra: dict[str, Any] = {"repetition_penalty": 1.0, "skip_special_tokens": True} if self.facts.is_vllm else {}
        if template is not None:
            self._extra.update(chat_template=template, add_generation_prompt=True)
        self.prompt_sent = prompt_record(self.server, self.facts, spec)
        log.info(
            "captioning through %s (%s), %d requests in flight",
            redact(self.server.base_url), self.facts.software or "an OpenAI-compatible server", self.server.concurrency,
        )

    @property
    def version(self) -> str:
        return f"openai-compatible server ({self.facts.software or 'unknown'})"

    def request_body(self, image_url: str, key: str, index: int) -> dict[str, Any]:
        """The chat completions request for caption `index` of the image under `key`."""
        sampling = self.spec.sampling
        return {
            "model": self.facts.model_id,
            "messages": caption_messages(self.server.prompt, self.server.system_prompt, image_url),
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": request_seed(sampling.seed, key, index),
            **self._extra,
        }

    def caption(
        self, items: Iterable[ImageRequest], should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[tuple[str, Caption]]:
        concurrency = self.server.concurrency
        count = self.spec.sampling.num_captions
        self._stop.clear()  # the last call's end (or a refused template) stopped that call, not this one
        jobs: queue.Queue[tuple[_Image, int] | None] = queue.Queue()
        results: queue.Queue[tuple[_Image, int, Caption | None]] = queue.Queue()
        threads = [
            threading.Thread(target=self._work, args=(jobs, results), name=f"caprl-openai-{n}", daemon=True)
            for n in range(concurrency)
        ]
        for thread in threads:
            thread.start()
        feeder: Feeder[ImageRequest] = Feeder(items, concurrency, name="caprl-openai-feeder")
        in_flight = 0
        exhausted = False
        try:
            while True:
                while not exhausted and in_flight + count <= max(concurrency, count):
                    item = feeder.take(None if in_flight else _INPUT_WAIT_S)
                    if isinstance(item, Ended):
                        exhausted = True
                    if not isinstance(item, ImageRequest):
                        break
                    image = _Image(item, count)
                    for index in range(count):
                        jobs.put((image, index))
                    in_flight += count
                if should_stop():
                    return
                if not in_flight:
                    if exhausted:
                        return
                    continue
                try:
                    image, index, caption = results.get(timeout=_RESULT_WAIT_S)
                except queue.Empty:
                    continue
                in_flight -= 1
                if caption is None:  # stopped while retrying
                    continue
                result = image.done(index, caption)
                if result is not None:
                    yield image.request.key, result
        finally:
            self._stop.set()
            for _ in threads:
                jobs.put(None)
            feeder.close()
            if self.retried:
                log.info("%d requests to the server were sent again after a transient failure", self.retried)

    def _work(self, jobs: queue.Queue, results: queue.Queue) -> None:
        while (job := jobs.get()) is not None:
            image, index = job
            if self._stop.is_set():
                continue
            try:
                caption = self._caption_one(image, index)
            except Exception as exc:  # never lose a request to a bug in building it
                caption = Caption.failed(f"{type(exc).__name__}: {exc}")
            results.put((image, index, caption))

    def _caption_one(self, image: _Image, index: int) -> Caption | None:
        """One request, retried while it fails transiently; None when the run stopped meanwhile."""
        body = self.request_body(image.url(), image.request.key, index)
        for delay in [*backoff_delays(self.server.retries), None]:
            try:
                return caption_of(self.client.post("/chat/completions", body))
            except Exception as exc:
                if isinstance(exc, ServerResponseError) and _UNTRUSTED_TEMPLATE in exc.message:
                    self._stop.set()
                    return Caption.failed(template_refused_message(self.server.base_url))
                if not is_transient(exc):
                    return Caption.failed(str(exc))
                if delay is None:
                    tries = self.server.retries + 1
                    return Caption.unavailable(f"server still failing after {tries} tries: {exc}")
            with self._count_lock:
                self.retried += 1
            if self._stop.wait(delay):
                return None
        return None

    def close(self) -> None:
        self._stop.set()


def api_key_of(variable: str | None) -> str | None:
    """The key in the environment variable `--api-key-env` names (checked to be set before the run)."""
    if variable is None:
        return None
    key = os.environ.get(variable)
    if not key:
        raise UsageError(f"--api-key-env {variable}: that environment variable is not set")
    return key


def template_refused_message(base_url: str) -> str:
    return (
        f"the vLLM server at {redact(base_url)} refuses per-request chat templates, which caprl needs to send "
        "CapRL's exact prompt (its stock template adds a system turn): start vllm serve with "
        "--trust-request-chat-template"
    )


def check_server(client: ServerClient, server: ServerSpec, spec: EngineSpec) -> ServerFacts:
    """Before any image: the server answers, serves `--model`, and (vLLM) takes caprl's template."""
    where = redact(server.base_url)
    entry = served_entry(client, server.base_url, server.model)
    model_id = str(entry["id"])
    software = None
    is_vllm = entry.get("owned_by") == "vllm"
    try:
        answer = client.get("/version", root=True, timeout=START_TIMEOUT_S)
        if isinstance(answer, dict) and isinstance(answer.get("version"), str):
            software, is_vllm = f"vllm {answer['version']}", True
    except (ServerResponseError, OSError):
        pass
    if is_vllm and software is None:
        software = "vllm"
    facts = ServerFacts(model_id=model_id, software=software, is_vllm=is_vllm)
    if is_vllm:
        check_template_accepted(client, facts, spec, where)
    return facts


def check_template_accepted(client: ServerClient, facts: ServerFacts, spec: EngineSpec, where: str) -> None:
    """Ask vLLM's /tokenize (no generation) whether it takes a request's chat template."""
    body = {
        "model": facts.model_id,
        "messages": [{"role": "user", "content": "caprl"}],
        "chat_template": literal_template(spec.prompt_text),
        "add_generation_prompt": True,
    }
    try:
        client.post("/tokenize", body, root=True, timeout=START_TIMEOUT_S)
    except ServerResponseError as exc:
        if _UNTRUSTED_TEMPLATE in exc.message:
            raise EngineStartError(template_refused_message(where)) from None
        log.debug("could not check the server's chat template handling: %s", exc)
    except OSError as exc:
        raise EngineStartError(f"cannot reach the server at {where}: {exc}") from None


def prompt_record(server: ServerSpec, facts: ServerFacts, spec: EngineSpec) -> dict[str, Any]:
    """What provenance records about how the prompt reached the model."""
    record: dict[str, Any] = {
        "endpoint": redact(server.base_url.rstrip("/")) + "/chat/completions",
        "served_model": facts.model_id,
        "server": facts.software,
    }
    if facts.is_vllm:
        record["rendered_by"] = "caprl: a per-request chat_template rendering prompt_text exactly"
    else:
        record["rendered_by"] = "the server's own chat template (caprl's prompt_text is not guaranteed)"
        record["messages"] = caption_messages(server.prompt, server.system_prompt, "<the image>")
    return record


def caption_of(answer: Any) -> Caption:
    """A chat completions answer as a Caption; token counts come from its `usage`."""
    try:
        choice = answer["choices"][0]
        text = choice["message"].get("content") or ""
        finish = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        return Caption.failed(f"the server's answer has no choice: {str(answer)[:200]}")
    usage = answer.get("usage") or {}
    prompt_tokens = usage.get("prompt_tokens")
    if finish not in ("stop", "length"):
        return Caption.failed(f"request ended with finish reason {finish!r}", prompt_tokens)
    return Caption(
        text=text,
        finish_reason=finish,
        prompt_tokens=prompt_tokens,
        output_tokens=usage.get("completion_tokens"),
    )
