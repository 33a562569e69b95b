"""The OpenAI-compatible API's pieces in memory: keys, windows, status mapping, image lines."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
from pydantic import ValidationError

from aigc.server.auth import KeyRing, hash_key, new_key
from aigc.server.batches import batch_id, job_id_of, status_of, window_seconds
from aigc.server.errors import APIError
from aigc.schemas.openai_images import read_openai_images
from aigc.schemas.parsing import validate_records
from aigc.schemas.settings import Settings
from aigc.schemas.tables import Job, utcnow


def test_keys_are_hashes_matched_to_their_owner():
    key, other = new_key(), new_key()
    assert key.startswith("sk-aigc-") and key != other and len(key) > 40
    ring = KeyRing([f"alice:{hash_key(key)}", f"bob:{hash_key(other)}", f"alice:{hash_key('rotated')}"])
    assert (ring.owner(key), ring.owner(other), ring.owner("rotated")) == ("alice", "bob", "alice")
    assert ring.owner("sk-aigc-guess") is None and ring.owner("") is None
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()


def test_settings_take_only_named_hashes():
    assert Settings(api_keys=f"a:{'0' * 64}, b.c:{'f' * 64}").api_keys == [f"a:{'0' * 64}", f"b.c:{'f' * 64}"]
    for bad in ("sk-aigc-plaintext", f"a:{'0' * 63}", f"a b:{'0' * 64}", f"a:{'G' * 64}"):
        with pytest.raises(ValidationError, match="AIGC_API_KEYS entry 1 must be NAME:SHA256HEX"):
            Settings(api_keys=bad)


def test_completion_windows():
    assert [window_seconds(w) for w in ("24h", "90m", "3s", "7d", "30d")] == [86400, 5400, 3, 604800, 2592000]
    for bad in ("24", "0h", "31d", "1w", "h24", ""):
        with pytest.raises(APIError, match="completion_window"):
            window_seconds(bad)


def test_batch_ids_are_job_ids():
    job_id = "0b9f5c1e-2d3a-4c5b-8e6f-7a8b9c0d1e2f"
    assert batch_id(job_id) == "batch_0b9f5c1e2d3a4c5b8e6f7a8b9c0d1e2f"
    assert job_id_of(batch_id(job_id)) == job_id
    assert job_id_of("batch_nothex") is None and job_id_of(job_id) is None and job_id_of("file-1") is None


@pytest.mark.parametrize("fields,expected", [
    ({"status": "queued"}, "in_progress"),
    ({"status": "running", "done": 3}, "in_progress"),
    ({"status": "running", "done": 4, "failed": 1}, "finalizing"),
    ({"status": "completed", "done": 5}, "completed"),
    ({"status": "completed_with_errors", "done": 4, "failed": 1}, "completed"),
    ({"status": "failed", "failed": 5}, "completed"),  # every request failed: the error file says why
    ({"status": "failed", "total": 0, "errors": [{"line": 1}]}, "failed"),  # the input was refused
    ({"status": "cancelling"}, "cancelling"),
    ({"status": "cancelled"}, "cancelled"),
    ({"status": "cancelling", "expired_at": utcnow()}, "finalizing"),
    ({"status": "cancelled", "expired_at": utcnow()}, "expired"),
])
def test_job_statuses_as_batch_statuses(fields, expected):
    job = Job(id="j", kind="article", model="m", **({"total": 5} | fields))
    assert status_of(job) == expected


def test_image_lines_become_image_set_items_or_named_problems():
    lines = [{"custom_id": "a", "method": "POST", "url": "/v1/images/generations",
              "body": {"prompt": "a face", "n": 3, "size": "64x64", "seed": 5, "grid": True}},
             {"custom_id": "b", "method": "POST", "url": "/v1/images/generations",
              "body": {"n": 0, "response_format": "b64_json", "size": "big"}},
             {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {}},
             {"custom_id": "d", "method": "POST", "url": "/v1/images/generations", "body": {"style": "vivid"}}]
    data = io.BytesIO(b"".join(json.dumps(line).encode() + b"\n" for line in lines))

    out = list(validate_records("image_set", read_openai_images(data)))

    assert out[0].input == {"n_images": 3, "seed": 5, "grid": True, "size": "64x64"}
    assert [(p.line, p.field) for p in out[1:]] == [
        (2, "body.n"), (2, "body.size"), (2, "body.response_format"), (3, "url"), (4, "body.style")]
    assert [p.code for p in out[1:]][-2:] == ["mismatched_endpoint", "extra_forbidden"]
