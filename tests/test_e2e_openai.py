"""`--engine openai` end to end: the real CLI against a real `vllm serve` (CPU build, tiny model) on
127.0.0.1, started once for the module through bench/vllm_serve.py, and a fault proxy in front of it
that answers 429/503 when told to. The offline transformers engine on the same images is the yardstick
for rows and prompt token counts."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ROOT
from contract import read_rows
from PIL import Image

pytestmark = pytest.mark.vllm

MAX_TOKENS = 6
COMMON = ("--max-tokens", str(MAX_TOKENS), "--no-progress", "--workers", "1")
SERVER_START_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `vllm serve` of the tiny model; yields its base URL (…/v1)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [
        sys.executable, str(ROOT / "bench" / "vllm_serve.py"), str(tiny_model),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "1024", "--trust-request-chat-template", "--no-enable-chunked-prefill",
        # Under its folder's path and, as CapRL-3B's model card serves it, under the name "caprl".
        "--served-model-name", str(tiny_model), "caprl",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JPEGs and PNGs (one with alpha) of different grid sizes."""
    folder = tmp_path_factory.mktemp("openai-images")
    for i in range(3):
        Image.new("RGB", (60 + 30 * i, 50 + 10 * i), (40 * i, 120, 200)).save(folder / f"photo{i}.jpg", quality=90)
    Image.new("RGBA", (90, 40), (10, 200, 30, 128)).save(folder / "alpha.png")
    Image.new("L", (50, 120), 77).save(folder / "sub.png")
    return folder


@pytest.fixture(scope="module")
def offline_rows(run_caprl, images: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The same images through the offline transformers engine."""
    output = tmp_path_factory.mktemp("offline") / "out.jsonl"
    result = run_caprl("caption", images, "-o", output, "--model", tiny_model, "--engine", "transformers", *COMMON)
    assert result.returncode == 0, result.stderr
    return {row["key"]: row for row in read_rows(output)}


class Faults:
    """What the proxy does to POST /v1/chat/completions: fail the first `fail_first` (429, 503, 429, …)
    or all of them; refuse request chat templates at /tokenize; and what it received."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fail_first = 0
        self.always = False
        self.refuse_template = False
        self.failed = 0
        self.passed = 0
        self.bodies: list[dict] = []
        self.requests: Counter[str] = Counter()

    def failure(self) -> int | None:
        with self.lock:
            if self.always or self.fail_first > 0:
                self.fail_first = max(0, self.fail_first - 1)
                self.failed += 1
                return 429 if self.failed % 2 else 503
            self.passed += 1
            return None


@pytest.fixture
def proxy(server: str) -> Iterator[tuple[Faults, str]]:
    """A fault proxy on 127.0.0.1 in front of the real server; yields (controls, its base URL)."""
    upstream = server[: -len("/v1")]
    faults = Faults()

    class Handler(BaseHTTPRequestHandler):
        def _forward(self, body: bytes | None) -> None:
            request = urllib.request.Request(upstream + self.path, data=body, method=self.command,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=120) as answer:
                    status, data = answer.status, answer.read()
            except urllib.error.HTTPError as exc:
                status, data = exc.code, exc.read()
            self._send(status, data)

        def _send(self, status: int, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            faults.requests[f"GET {self.path}"] += 1
            self._forward(None)

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            faults.requests[f"POST {self.path}"] += 1
            if self.path == "/tokenize" and faults.refuse_template:
                message = "Chat template is passed with request, but --trust-request-chat-template is not set."
                return self._send(400, json.dumps({"error": {"message": message}}).encode())
            if self.path == "/v1/chat/completions":
                with faults.lock:
                    faults.bodies.append(json.loads(body))
                status = faults.failure()
                if status is not None:
                    return self._send(status, json.dumps({"error": {"message": "busy"}}).encode())
            self._forward(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield faults, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def openai_run(run_caprl, images: Path, output: Path, model: Path, base_url: str, *more: str):
    return run_caprl("caption", images, "-o", output, "--model", model, "--engine", "openai",
                     "--base-url", base_url, *COMMON, *more)


def error_kind(row: dict) -> str | None:
    return row["error"].split(":", 1)[0] if row.get("error") else None


def test_rows_prompt_tokens_and_resume_match_offline(
    run_caprl, proxy, images: Path, tiny_model: Path, offline_rows: dict[str, dict], tmp_path: Path
) -> None:
    """Through a proxy that answers 429/503 to the first three requests: they are retried with
    backoff and every row is ok, with the same keys, statuses, columns and prompt token counts as the
    offline engine; each request carried the seed seeding.py gives its key; a second run does nothing
    and sends nothing."""
    from caprl_cli.engines.seeding import request_seed

    faults, base_url = proxy
    faults.fail_first = 3
    output = tmp_path / "out.jsonl"
    first = openai_run(run_caprl, images, output, tiny_model, base_url, "--retries", "3", "--concurrency", "2")
    assert first.returncode == 0, first.stderr
    assert faults.failed == 3
    assert faults.requests["POST /v1/chat/completions"] == len(offline_rows) + 3
    rows = {row["key"]: row for row in read_rows(output)}
    assert sorted(rows) == sorted(offline_rows)
    for key, row in rows.items():
        offline = offline_rows[key]
        assert set(row) == set(offline)
        assert (row["status"], row["width"], row["height"]) == (offline["status"], offline["width"], offline["height"])
        assert row["prompt_tokens"] == offline["prompt_tokens"], key
        assert row["finish_reason"] in ("stop", "length") and 1 <= row["output_tokens"] <= MAX_TOKENS
    seeds = {body["seed"] for body in faults.bodies}
    assert seeds == {request_seed(0, key) for key in rows}
    summary = json.loads(Path(f"{output}.summary.json").read_text())
    assert summary["engine"] == "openai" and summary["prompt_sent"]["server"].startswith("vllm")
    assert "chat_template" in summary["prompt_sent"]["rendered_by"]

    sent = faults.requests["POST /v1/chat/completions"]
    before = output.read_bytes()
    second = openai_run(run_caprl, images, output, tiny_model, base_url)
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stderr
    assert faults.requests["POST /v1/chat/completions"] == sent
    assert output.read_bytes() == before


def test_the_stock_template_would_add_a_system_turn(
    server: str, images: Path, tiny_model: Path, offline_rows: dict[str, dict]
) -> None:
    """The control for the test above: the same request without caprl's chat_template is rendered
    with the stock template's default system turn, so its prompt is longer than the offline one."""
    from caprl_cli.engines.base import ImageRequest
    from caprl_cli.engines.openai_engine import caption_messages, data_url
    from caprl_cli.prepare.grid import Grid

    key = "photo1.jpg"
    with Image.open(images / key) as opened:
        width, height = Grid(28).target_size(*opened.size)
        image = opened.convert("RGB").resize((width, height))
    url = data_url(ImageRequest(key, image, lossy_source=True))
    body = {"model": str(tiny_model), "messages": caption_messages("Please describe this image in detail.", None, url),
            "max_tokens": 1}
    plain = get_json(f"{server}/chat/completions", body)
    assert plain["usage"]["prompt_tokens"] > offline_rows[key]["prompt_tokens"]


def test_a_server_that_keeps_failing_leaves_unavailable_rows_for_the_next_run(
    run_caprl, proxy, server: str, images: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """Still failing after --retries: `unavailable` rows and exit 3 (partial: run again), with a closing
    line that claims no rate for the captions it did not make; the next plain run (here straight
    against the server) captions exactly those and exits 0."""
    faults, base_url = proxy
    faults.always = True
    output = tmp_path / "out.jsonl"
    first = openai_run(run_caprl, images, output, tiny_model, base_url, "--retries", "1")
    assert first.returncode == 3, first.stderr
    closing = first.stderr.strip().splitlines()[-1]
    assert closing.startswith("caprl: captioned 0 of 5 images") and "images/s" not in closing
    rows = read_rows(output)
    assert len(rows) == 5
    assert {(row["status"], error_kind(row)) for row in rows} == {("error", "unavailable")}
    assert faults.requests["POST /v1/chat/completions"] == 5 * 2

    second = openai_run(run_caprl, images, output, tiny_model, server)
    assert second.returncode == 0, second.stderr
    rows = read_rows(output)
    assert sorted(row["key"] for row in rows) == sorted(p.name for p in images.iterdir())
    assert all(row["status"] == "ok" for row in rows)


def test_unreachable_server_is_one_line_and_nothing_written(run_caprl, images: Path, tiny_model: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    result = openai_run(run_caprl, images, output, tiny_model, f"http://127.0.0.1:{free_port()}/v1", "--retries", "0")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("caprl: error: cannot reach the server at http://127.0.0.1:")
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_another_model_served_is_refused(run_caprl, server: str, images: Path, tiny_model: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    output = tmp_path / "out" / "out.jsonl"
    result = openai_run(run_caprl, images, output, other, server)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("caprl: error: the server at") and str(tiny_model) in last and f"not {other}" in last
    assert not output.exists() and not (output.parent / "out.jsonl.caprl").exists()


def test_a_server_refusing_request_templates_stops_before_any_image(
    run_caprl, proxy, images: Path, tiny_model: Path, tmp_path: Path
) -> None:
    faults, base_url = proxy
    faults.refuse_template = True
    output = tmp_path / "out.jsonl"
    result = openai_run(run_caprl, images, output, tiny_model, base_url)
    assert result.returncode == 1
    assert "--trust-request-chat-template" in result.stderr.strip().splitlines()[-1]
    assert faults.requests["POST /v1/chat/completions"] == 0
    assert not output.exists()


def test_cli_refuses_base_url_without_openai_and_openai_without_base_url(run_caprl, images: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    without = run_caprl("caption", images, "-o", output, "--engine", "openai")
    assert without.returncode == 2 and "--base-url" in without.stderr
    stray = run_caprl("caption", images, "-o", output, "--engine", "transformers", "--base-url", "http://127.0.0.1:1/v1")
    assert stray.returncode == 2 and "--base-url applies to --engine openai only" in stray.stderr
    assert not output.exists()


def test_images_are_sent_lossless_unless_the_source_was_jpeg() -> None:
    from caprl_cli.engines.base import ImageRequest
    from caprl_cli.engines.openai_engine import encode_image

    image = Image.new("RGB", (56, 28), (1, 2, 3))
    mime, data = encode_image(ImageRequest("a.png", image))
    assert mime == "image/png"
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.convert("RGB").tobytes() == image.tobytes()
    mime, data = encode_image(ImageRequest("a.jpg", image, lossy_source=True))
    assert mime == "image/jpeg" and Image.open(io.BytesIO(data)).size == (56, 28)


def test_the_model_cards_recipe_captions_through_a_server_named_caprl(
    run_caprl, server: str, images: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """examples/card_recipe.sh against the server (started as the card says, --served-model-name caprl):
    `--model caprl` is what it serves, and the processor comes from the root it reports, a folder here;
    provenance says which processor prepared the images."""
    port = server.rsplit(":", 1)[1].split("/")[0]
    output = tmp_path / "out.jsonl"
    env = {
        **os.environ, "SERVE": "0", "PORT": port, "IMAGES": str(images), "OUT": str(output),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(
        ["bash", str(ROOT / "examples" / "card_recipe.sh"), *COMMON], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    rows = read_rows(output)
    assert sorted(row["key"] for row in rows) == sorted(p.name for p in images.iterdir())
    assert all(row["status"] == "ok" for row in rows)
    summary = json.loads(Path(f"{output}.summary.json").read_text())
    assert summary["processor"] == str(tiny_model.resolve())
    assert summary["prompt_sent"]["served_model"] == "caprl" and summary["model"] == "caprl"


def test_processor_option_wins_and_an_unknown_root_is_one_line(
    run_caprl, server: str, images: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """A server whose root names nothing caprl can find (a folder on another machine, no hub id in its
    name) stops with exit 2 in one line naming its id, its root and --processor; --processor DIR then
    supplies the files, and provenance records it."""
    listing = {"object": "list", "data": [{"id": "caprl", "object": "model", "root": "/elsewhere/my-captioner", "owned_by": "vllm"}]}

    class Lister(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            data = json.dumps(listing).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    lister = ThreadingHTTPServer(("127.0.0.1", 0), Lister)
    threading.Thread(target=lister.serve_forever, daemon=True).start()
    try:
        output = tmp_path / "out.jsonl"
        base = f"http://127.0.0.1:{lister.server_address[1]}/v1"
        refused = run_caprl("caption", images, "-o", output, "--engine", "openai", "--base-url", base, "--model", "caprl", *COMMON)
    finally:
        lister.shutdown()
        lister.server_close()
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "'caprl'" in lines[0] and "/elsewhere/my-captioner" in lines[0] and "--processor" in lines[0]
    assert not output.exists()

    copy = tmp_path / "processor-copy"
    shutil.copytree(tiny_model, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    given = run_caprl("caption", images, "-o", output, "--engine", "openai", "--base-url", server, "--model", "caprl",
                      "--processor", copy, "--limit", "1", *COMMON)
    assert given.returncode == 0, given.stderr
    assert json.loads(Path(f"{output}.summary.json").read_text())["processor"] == str(copy)


@pytest.mark.timeout(300)  # before the fix the second call waited forever for workers that had stopped
def test_one_engine_serves_several_caption_calls(server: str, images: Path, tiny_model: Path) -> None:
    """The engine's stop flag belongs to one caption() call: a second call captions too."""
    from caprl_cli.engines.base import ImageRequest
    from caprl_cli.engines.openai_engine import OpenAIEngine
    from caprl_cli.execute.job import engine_spec, load_model
    from caprl_cli.settings import CaptionSettings

    settings = CaptionSettings(
        inputs=(str(images),), output=None, output_format="sidecar", engine="openai", base_url=server,
        model=str(tiny_model), max_tokens=MAX_TOKENS,
    )
    source, profile = load_model(settings)
    engine = OpenAIEngine(engine_spec(settings, source, profile))
    try:
        picture = Image.new("RGB", (56, 56), (200, 30, 30))
        for call in range(2):
            answers = list(engine.caption(iter([ImageRequest(f"k{call}", picture)])))
            assert [(key, caption.finish_reason in ("stop", "length")) for key, caption in answers] == [(f"k{call}", True)]
    finally:
        engine.close()
