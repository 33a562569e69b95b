"""Submitting: everything committed before anything is enqueued; bad input stores nothing."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import redis
from sqlalchemy import func, select
from sqlmodel import Session

from aigc import DispatchError, api
from aigc.schemas.db import get_engine, upgrade
from aigc.schemas.dispatch import queue_name
from aigc.schemas.parsing import InputError
from aigc.schemas.settings import Settings
from aigc.schemas.tables import Item, Job


@pytest.fixture
def settings(database_url, redis_url, tmp_path):
    upgrade(database_url)
    # An empty models directory: the default text model is the shipped fallback, whatever this
    # host has fetched.
    return Settings(broker_url=redis_url, database_url=database_url, chunk_size=10, data_dir=tmp_path,
                    models_dir=tmp_path / "models")


def counts(settings: Settings) -> tuple[int, int]:
    with Session(get_engine(settings.database_url)) as session:
        return (session.exec(select(func.count()).select_from(Job)).one()[0],
                session.exec(select(func.count()).select_from(Item)).one()[0])


def queued_messages(settings: Settings, kind: str) -> list[dict]:
    """Messages in the kind's queue, at every priority level (one Redis list per level)."""
    client = redis.Redis.from_url(settings.broker_url)
    return [json.loads(raw) for key in sorted(client.keys(queue_name(kind) + "*"))
            for raw in client.lrange(key, 0, -1)]


def test_items_are_committed_then_enqueued_as_chunks_of_ids(settings):
    client = redis.Redis.from_url(settings.broker_url)
    for key in client.keys(queue_name("article") + "*"):
        client.delete(key)
    job_id = api.submit("article", ({"topic": f"t{i}"} for i in range(25)), settings=settings)

    job = api.status(job_id, settings=settings)
    assert (job.status, job.total, job.kind, job.model) == ("queued", 25, "article", "text-small")
    messages = queued_messages(settings, "article")
    assert [m["headers"]["task"] for m in messages] == ["aigc.article"] * 3  # one name per kind
    bodies = [json.loads(base64.b64decode(m["body"])) for m in messages]
    assert sorted(body[1]["items"] for body in bodies) == [5, 10, 10]  # sizes, shown by Flower
    chunks = [body[0] for body in bodies]
    assert all(args[0] == job_id for args in chunks)
    sent_ids = sorted(i for args in chunks for i in args[1])
    with Session(get_engine(settings.database_url)) as session:
        stored = session.exec(select(Item.id).where(Item.job_id == job_id)).scalars().all()
    assert sent_ids == sorted(stored) and len(sent_ids) == 25  # ids only, every item once


def test_invalid_items_store_nothing(settings):
    before = counts(settings)
    items = [{"topic": "fine"}] * 7000 + [{"topic": "x", "length": 1}, {"tone": "calm"}]
    with pytest.raises(InputError) as caught:
        api.submit("article", items, settings=settings)
    assert [str(p) for p in caught.value.problems] == [
        "7001:length: must be a number of words from 20 to 5000, or short (about 150 words), "
        "medium (about 400 words), long (about 800 words); got 1",
        "7002:topic: Field required (or give a free-form 'prompt' or chat 'messages')",
    ]
    assert counts(settings) == before  # the 7000 good rows, already inserted in bulk, rolled back


@pytest.mark.parametrize("kind,params,expected", [
    ("poem", None, "0:kind: unknown kind 'poem'"),
    ("article", {"max_new_tokens": 0}, "0:params.max_new_tokens"),
    ("article", {"temperature": -1}, "0:params.temperature"),
])
def test_bad_kind_or_params_store_nothing(settings, kind, params, expected):
    before = counts(settings)
    with pytest.raises(InputError, match=expected):
        api.submit(kind, [{"topic": "x"}], params=params, settings=settings)
    assert counts(settings) == before


def test_an_empty_input_is_refused(settings):
    with pytest.raises(InputError, match="no items"):
        api.submit("article", [], settings=settings)


def test_idempotency_key_returns_the_same_job_and_refuses_different_input(settings):
    key = f"k-{uuid.uuid4()}"
    first = api.submit("article", [{"topic": "a"}], idempotency_key=key, settings=settings)
    before = counts(settings)
    assert api.submit("article", [{"topic": "a"}], idempotency_key=key, settings=settings) == first
    for kind, items, params, differs in [("article", [{"topic": "a"}, {"topic": "b"}], None, "items"),
                                         ("article", [{"topic": "z"}], None, "items"),
                                         ("ad_copy", [{"product": "a"}], None, "kind"),
                                         ("article", [{"topic": "a"}], {"max_new_tokens": 9}, "params")]:
        with pytest.raises(api.IdempotencyConflictError, match=rf"key '{key}' belongs to job {first}, "
                           rf"submitted with a different {differs}"):
            api.submit(kind, items, params=params, idempotency_key=key, settings=settings)
    assert counts(settings) == before


def test_an_unreachable_broker_keeps_the_job_and_says_how_to_resume(database_url, tmp_path):
    settings = Settings(broker_url="redis://127.0.0.1:1/0", database_url=database_url, data_dir=tmp_path)
    before = counts(settings)
    with pytest.raises(DispatchError, match=r"run `aigc resume [0-9a-f-]{36}`"):
        api.submit("article", [{"topic": "a"}, {"topic": "b"}], settings=settings)
    assert counts(settings) == (before[0] + 1, before[1] + 2)  # nothing lost


def test_inputs_round_trip_exactly_through_bulk_insert(settings):
    tricky = ["é ✓ 漢字 🚀", "tab\there", "back\\slash", 'quote " and \\N', "line\nbreak", "cr\r\nlf", "a\u2028b\u00a0c\ufeffd"]
    items = [{"custom_id": f"u{i}", "prompt": text} for i, text in enumerate(tricky)]
    job_id = api.submit("article", items, settings=settings)
    with Session(get_engine(settings.database_url)) as session:
        stored = session.exec(select(Item.custom_id, Item.input).where(Item.job_id == job_id)
                              .order_by(Item.index)).all()
    assert [(c, i["prompt"]) for c, i in stored] == [(f"u{i}", t.strip()) for i, t in enumerate(tricky)]


def test_submit_file_takes_the_options_of_submit_typed():
    import inspect

    from aigc import api

    options = {name: p for name, p in inspect.signature(api.submit).parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY}
    file_options = inspect.signature(api.submit_file).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in file_options.values())
    for name, parameter in options.items():
        assert file_options[name].annotation == parameter.annotation, name
        assert file_options[name].default == parameter.default, name
