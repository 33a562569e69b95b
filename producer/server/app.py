"""``aigc serve``: OpenAI's Files and Batches API over aigc's jobs (FastAPI, run by uvicorn).

The server imports only ``schemas`` and the producer: torch never loads here. Every request
reads and writes SQL (the source of truth), so any number of servers can run side by side,
and one killed mid-batch loses nothing: the workers carry on and a restarted server reads
the same rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from sqlalchemy import text

from aigc.schemas.db import ensure_schema
from aigc.schemas.settings import Settings, get_settings

from ..dispatch import _client
from . import batches, errors, files
from .auth import KeyRing, caller
from .errors import not_found
from .expiry import keep_expiring
from .uploads import FileStore

Caller = Annotated[str, Depends(caller)]
MODELS_TTL = 10.0  # seconds a worker census is reused
CENSUS_SECONDS = 1.0  # how long workers are given to answer it


def create_app(settings: Settings | None = None, *, open_access: bool = False) -> FastAPI:
    """The API application. ``open_access``: no keys asked (``aigc serve --open``, loopback only)."""
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = ensure_schema(settings.database_url)  # fails loudly if not migrated
        expiring = asyncio.create_task(keep_expiring(app.state.engine))
        try:
            yield
        finally:
            expiring.cancel()

    app = FastAPI(title="aigc", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.keys = KeyRing(settings.api_keys)
    app.state.open_access = open_access
    app.state.store = FileStore(settings.artifacts())
    app.state.census = (0.0, {})
    errors.install(app)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", retrieve_model, methods=["GET"])
    return app


def health(request: Request) -> dict[str, str]:
    """For load balancers and compose: 200 while the database answers (no key needed)."""
    with request.app.state.engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    return {"status": "ok"}


def _census(request: Request) -> dict[str, dict[str, Any]]:
    """{model: {"created", "kinds"}} over every worker that answers within a second, cached."""
    state = request.app.state
    taken, models = state.census
    if time.monotonic() - taken < MODELS_TTL:
        return models
    replies = _client(state.settings).control.broadcast("aigc_models", reply=True,
                                                        timeout=CENSUS_SECONDS)
    models = {}
    for reply in replies or ():
        for answer in reply.values():
            if not isinstance(answer, dict):
                continue
            for model, kinds in (answer.get("models") or {}).items():
                entry = models.setdefault(model, {"created": answer.get("started", 0), "kinds": set()})
                entry["kinds"].update(kinds)
    state.census = (time.monotonic(), models)
    return models


def _model_object(model: str, entry: dict[str, Any]) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": int(entry["created"]), "owned_by": "aigc",
            "kinds": sorted(entry["kinds"])}


def list_models(request: Request, owner: Caller) -> dict[str, Any]:
    """The models the running workers serve: each consumed kind's default, and warm ones."""
    models = _census(request)
    return {"object": "list", "data": [_model_object(m, e) for m, e in sorted(models.items())]}


def retrieve_model(request: Request, model: str, owner: Caller) -> dict[str, Any]:
    models = _census(request)
    if model not in models:
        raise not_found("model", model)
    return _model_object(model, models[model])
