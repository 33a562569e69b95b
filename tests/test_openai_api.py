"""The OpenAI-compatible API (``aigc serve``), driven by the official ``openai`` SDK against a
real uvicorn server, a real worker, Redis and PostgreSQL. The SDK's own types judge every
object and output line."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import urllib.request
from pathlib import Path

import openai
import pytest
from openai import OpenAI
from openai.types import Batch, Completion, FileObject, ImagesResponse
from openai.types.chat import ChatCompletion

from aigc import api
from aigc.schemas.db import upgrade
from aigc.schemas.settings import Settings

from api_server import (ServerProcess, batch_file, chat_line, completion_line, jsonl, wait_for)
from conftest import WorkerProcess, plain_rows, run_cli
from tiny_models import build_tiny_dcgan

pytestmark = pytest.mark.integration
KEYS = {"alice": "sk-aigc-alice-test-key", "bob": "sk-aigc-bob-test-key"}
UPLOAD_LIMIT = 64_000


@pytest.fixture(scope="module")
def served(postgres_url, redis_url, tiny_model, tmp_path_factory):
    """PostgreSQL, Redis, one worker (tiny GPT-2 and tiny DCGAN) and one ``aigc serve``."""
    folder = tmp_path_factory.mktemp("api")
    gan = build_tiny_dcgan(folder / "tiny-dcgan")
    settings = Settings(
        broker_url=redis_url, database_url=postgres_url, text_model=str(tiny_model),
        image_model=str(gan), artifact_root=str(folder / "artifacts"), data_dir=folder,
        chunk_size=8, max_batch_rows=8, api_max_upload_bytes=UPLOAD_LIMIT,
        api_keys=[f"{name}:{hashlib.sha256(key.encode()).hexdigest()}" for name, key in KEYS.items()])
    upgrade(postgres_url)
    worker = WorkerProcess(settings, folder / "worker.log")
    server = ServerProcess(settings, folder / "server.log")
    try:
        server.start()
        worker.wait_ready()
        yield settings, server, worker, folder
    finally:
        server.stop()
        worker.stop()


def client(server: ServerProcess, name: str = "alice", **options) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=KEYS.get(name, name), max_retries=0, **options)


def upload(sdk: OpenAI, lines: list[dict], name: str = "batch.jsonl") -> FileObject:
    return sdk.files.create(file=(name, batch_file(lines)), purpose="batch")


def test_chat_and_completion_batches_end_to_end(served):
    settings, server, _, _ = served
    sdk = client(server)
    chat_lines = [chat_line(f"chat-{i}", f"Say {i}", max_tokens=5) for i in range(5)]
    chat_lines.append(chat_line("two", n=2, max_tokens=4, seed=3, temperature=0.7))
    text_lines = [completion_line(f"text-{i}", max_tokens=6) for i in range(3)]
    text_lines.append(completion_line("too-long", max_tokens=4000))  # past the tiny model's context

    chat_file = upload(sdk, chat_lines, "chat.jsonl")
    assert isinstance(chat_file, FileObject) and chat_file.purpose == "batch"
    assert chat_file.bytes == len(batch_file(chat_lines))
    assert sdk.files.content(chat_file.id).content == batch_file(chat_lines)
    chat = sdk.batches.create(input_file_id=chat_file.id, endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"team": "docs"})
    text = sdk.batches.create(input_file_id=upload(sdk, text_lines).id, endpoint="/v1/completions",
                              completion_window="24h")
    assert chat.status == "in_progress" and chat.request_counts.total == 6
    assert chat.metadata == {"team": "docs"} and chat.model == str(settings.text_model)

    chat = wait_for(sdk, chat.id)
    text = wait_for(sdk, text.id)

    assert chat.status == text.status == "completed"
    assert chat.completed_at >= chat.in_progress_at >= chat.created_at and chat.error_file_id is None
    output = jsonl(sdk.files.content(chat.output_file_id).text)
    assert sorted(line["custom_id"] for line in output) == sorted(line["custom_id"] for line in chat_lines)
    bodies = {line["custom_id"]: ChatCompletion.model_validate(line["response"]["body"]) for line in output}
    assert all(body.choices[0].message.role == "assistant" for body in bodies.values())
    assert [c.index for c in bodies["two"].choices] == [0, 1]
    assert chat.usage.output_tokens == sum(b.usage.completion_tokens for b in bodies.values())
    assert chat.request_counts.completed == 6 and chat.request_counts.failed == 0
    output_file = sdk.files.retrieve(chat.output_file_id)
    assert output_file.purpose == "batch_output"
    assert output_file.bytes == len(sdk.files.content(chat.output_file_id).content)

    assert (text.request_counts.completed, text.request_counts.failed) == (3, 1)
    for line in jsonl(sdk.files.content(text.output_file_id).text):
        Completion.model_validate(line["response"]["body"])
    (error,) = jsonl(sdk.files.content(text.error_file_id).text)
    assert error["custom_id"] == "too-long" and error["response"] is None
    assert error["error"]["code"] == "max_new_tokens_too_large"

    # The batch is an aigc job: the same tables, its file, endpoint and metadata kept on it.
    (job,) = plain_rows(settings.database_url, "SELECT id, owner, input_file_id, endpoint, kind "
                        "FROM jobs WHERE input_file_id = :f", f=chat_file.id)
    assert chat.id == "batch_" + job["id"].replace("-", "")
    assert (job["owner"], job["endpoint"], job["kind"]) == ("alice", "/v1/chat/completions", "article")
    assert "batch_" in run_cli(settings, "status", job["id"]).stdout
    assert api.status(job["id"], settings=settings).meta == {"team": "docs"}


def test_models_lists_what_the_workers_serve(served):
    settings, server, _, _ = served
    with urllib.request.urlopen(server.base_url.removesuffix("/v1") + "/health", timeout=5) as health:
        assert json.load(health) == {"status": "ok"}  # no key: for load balancers
    models = {model.id: model for model in client(server).models.list()}
    assert str(settings.text_model) in models and str(settings.image_model) in models
    assert client(server).models.retrieve(str(settings.image_model)).owned_by == "aigc"


def test_keys_owners_and_404s(served):
    _, server, _, _ = served
    alice, bob = client(server), client(server, "bob")
    mine = upload(alice, [chat_line("a", max_tokens=2)])
    batch = alice.batches.create(input_file_id=mine.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")

    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-aigc-not-a-key").batches.list()
    with pytest.raises(openai.AuthenticationError, match="didn't provide an API key"):
        alice.files.list(extra_headers={"Authorization": openai.omit})  # no key at all
    for attempt in (lambda: bob.batches.retrieve(batch.id), lambda: bob.batches.cancel(batch.id),
                    lambda: bob.files.retrieve(mine.id), lambda: bob.files.content(mine.id),
                    lambda: bob.files.delete(mine.id),
                    lambda: bob.batches.create(input_file_id=mine.id, endpoint="/v1/chat/completions",
                                               completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert batch.id not in {b.id for b in bob.batches.list()}
    assert mine.id not in {f.id for f in bob.files.list()}
    assert alice.files.delete(mine.id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.files.content(mine.id)
    assert wait_for(alice, batch.id).status == "completed"  # its items were stored already

    again = upload(alice, [chat_line("b", max_tokens=2)])
    first, retry = (alice.batches.create(input_file_id=again.id, endpoint="/v1/chat/completions",
                                         completion_window="24h", extra_headers={"Idempotency-Key": "k-1"})
                    for _ in range(2))
    assert first.id == retry.id  # a retried create returns the batch it made
    with pytest.raises(openai.BadRequestError, match="different items"):  # not a retry: refused
        alice.batches.create(input_file_id=upload(alice, [chat_line("c", max_tokens=3)]).id,
                             endpoint="/v1/chat/completions", completion_window="24h",
                             extra_headers={"Idempotency-Key": "k-1"})


def test_a_file_with_bad_lines_fails_the_batch_naming_them(served):
    settings, server, _, _ = served
    sdk = client(server)
    lines = [chat_line("ok", max_tokens=2), completion_line("wrong-endpoint"),
             chat_line("hot", temperature=9), chat_line("ok")]
    source = batch_file(lines) + b"{not json\n"
    bad = sdk.files.create(file=("bad.jsonl", source), purpose="batch")

    batch = sdk.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h")

    Batch.model_validate(batch.model_dump())
    assert batch.status == "failed" and batch.failed_at and batch.request_counts.total == 0
    errors = [(e.line, e.param, e.code) for e in batch.errors.data]
    assert errors == [(2, "url", "mismatched_endpoint"), (3, "body.temperature", "invalid_value"),
                      (4, "custom_id", "duplicate_custom_id"), (5, None, "invalid_json_line")]
    assert all(e.message for e in batch.errors.data)
    assert sdk.batches.retrieve(batch.id).status == "failed"
    with pytest.raises(openai.BadRequestError):
        sdk.batches.create(input_file_id=bad.id, endpoint="/v1/embeddings", completion_window="24h")


def test_an_upload_over_the_limit_is_413_and_leaves_nothing(served):
    _, server, _, folder = served
    sdk = client(server)
    before = {f.id for f in sdk.files.list()}
    stored = set((folder / "artifacts" / "files").iterdir())
    big = batch_file([chat_line(f"c{i}", "x" * 200) for i in range(400)])
    assert len(big) > UPLOAD_LIMIT

    with pytest.raises(openai.APIStatusError) as refused:
        sdk.files.create(file=("big.jsonl", big), purpose="batch")

    assert refused.value.status_code == 413
    assert {f.id for f in sdk.files.list()} == before
    assert set((folder / "artifacts" / "files").iterdir()) == stored  # no file, no .part left


def test_twenty_batches_created_at_once_and_listed_page_by_page(served):
    _, server, _, _ = served
    sdk = client(server, "bob")
    source = upload(sdk, [completion_line(f"p{i}", max_tokens=2) for i in range(3)])

    def create(number: int) -> str:
        return sdk.batches.create(input_file_id=source.id, endpoint="/v1/completions",
                                  completion_window="24h", metadata={"n": str(number)}).id

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        created = list(pool.map(create, range(20)))

    assert len(set(created)) == 20
    first = sdk.batches.list(limit=7)
    assert len(first.data) == 7 and first.has_more
    listed = [batch.id for batch in sdk.batches.list(limit=7)]  # the SDK follows `after` itself
    assert sorted(listed) == sorted(created) and len(listed) == 20
    assert listed[:7] == [b.id for b in first.data]
    created_at = [sdk.batches.retrieve(b).created_at for b in listed]
    assert created_at == sorted(created_at, reverse=True)  # newest first
    for batch_id in created:
        assert wait_for(sdk, batch_id).request_counts.completed == 3


def test_cancel_mid_batch_keeps_what_finished(served):
    _, server, _, _ = served
    sdk = client(server)
    lines = [completion_line(f"s{i}", f"Story {i}:", max_tokens=160) for i in range(200)]  # seconds of work
    batch = sdk.batches.create(input_file_id=upload(sdk, lines).id, endpoint="/v1/completions",
                               completion_window="24h")
    wait_for(sdk, batch.id, until=lambda b: b.request_counts.completed >= 8)

    cancelling = sdk.batches.cancel(batch.id)
    batch = wait_for(sdk, batch.id, ("cancelled",))

    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    assert batch.cancelled_at and 8 <= batch.request_counts.completed < 200
    output = jsonl(sdk.files.content(batch.output_file_id).text)
    assert len(output) == batch.request_counts.completed
    done = sdk.batches.create(input_file_id=upload(sdk, [completion_line("d")]).id, endpoint="/v1/completions",
                              completion_window="24h")
    assert wait_for(sdk, done.id).status == "completed"
    with pytest.raises(openai.BadRequestError):
        sdk.batches.cancel(done.id)


def test_a_batch_past_its_window_expires_and_keeps_its_results(served):
    _, server, _, _ = served
    sdk = client(server)
    # far more than 3 s of work (at 64 tokens each a 2-core Zen 4 had done 168 of 400 at expiry)
    lines = [completion_line(f"e{i}", f"Tale {i}:", max_tokens=192) for i in range(400)]
    batch = sdk.batches.create(input_file_id=upload(sdk, lines).id, endpoint="/v1/completions",
                               completion_window="3s")
    assert batch.expires_at - batch.created_at == 3

    batch = wait_for(sdk, batch.id, ("expired",), timeout=60)

    assert batch.expired_at >= batch.expires_at and 0 < batch.request_counts.completed < 400
    assert len(jsonl(sdk.files.content(batch.output_file_id).text)) == batch.request_counts.completed


def test_the_server_killed_mid_batch_loses_nothing(served):
    settings, server, _, folder = served
    sdk = client(server)
    # 64 x 128 tokens at 8 rows a step: over a second of work even where the tiny model is
    # fast, so the kill (one 0.2 s poll after the 4th result) lands mid-batch
    lines = [chat_line(f"k{i}", f"Item {i}", max_tokens=128) for i in range(64)]
    batch = sdk.batches.create(input_file_id=upload(sdk, lines).id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    seen = wait_for(sdk, batch.id, until=lambda b: b.request_counts.completed >= 4)

    server.kill()
    try:
        assert seen.request_counts.completed < 64  # killed mid-batch
        with pytest.raises(openai.APIConnectionError):
            sdk.batches.retrieve(batch.id)
    finally:
        server.start()  # the module's other tests share this server

    batch = wait_for(sdk, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 64
    output = jsonl(sdk.files.content(batch.output_file_id).text)
    assert sorted(line["custom_id"] for line in output) == sorted(f"k{i}" for i in range(64))


def test_image_sets_as_images_responses(served):
    _, server, _, folder = served
    sdk = client(server)
    lines = [{"custom_id": "faces", "method": "POST", "url": "/v1/images/generations",
              "body": {"prompt": "a face", "n": 3, "size": "64x64", "seed": 7}},
             {"custom_id": "huge", "method": "POST", "url": "/v1/images/generations",
              "body": {"prompt": "a face", "n": 1, "size": "1024x1024"}}]
    batch = sdk.batches.create(input_file_id=upload(sdk, lines).id, endpoint="/v1/images/generations",
                               completion_window="24h")
    batch = wait_for(sdk, batch.id)

    assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("completed", 1, 1)
    (line,) = jsonl(sdk.files.content(batch.output_file_id).text)
    images = ImagesResponse.model_validate(line["response"]["body"])
    assert len(images.data) == 3 and images.size == "64x64" and images.output_format == "png"
    for image in images.data:
        assert image.url.startswith("file://") and Path(image.url.removeprefix("file://")).is_file()
    (error,) = jsonl(sdk.files.content(batch.error_file_id).text)
    assert error["error"]["code"] == "size_not_supported" and "64x64" in error["error"]["message"]


def test_serve_refuses_to_run_open_unless_told_and_on_loopback(served):
    settings, _, _, _ = served
    keyless = settings.model_copy(update={"api_keys": []})
    refused = run_cli(keyless, "serve", "--port", "1", check=False)
    assert refused.returncode == 2 and "AIGC_API_KEYS" in refused.stderr
    exposed = run_cli(keyless, "serve", "--open", "--host", "0.0.0.0", check=False)
    assert exposed.returncode == 2 and "loopback" in exposed.stderr
