"""OpenAI Batch lines for ``/v1/images/generations`` (an aigc extension), read into ``image_set``
records: ``n`` becomes ``n_images``, ``size`` is kept for the worker to check, and aigc's own
``seed``, ``label`` and ``grid`` pass through. A field asking for anything but PNG URLs is
refused (docs/openai-api.md).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .enums import Kind
from .openai_batch import BODY_MESSAGES, LINE_MESSAGES
from .parsing import Problem, problems_from, read_jsonl
from .specs import SPECS, CustomId, ImageSize, ShortText

IMAGES_URL = "/v1/images/generations"
IMAGES_KIND = Kind.image_set


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageLine(_Strict):
    """One line of an image batch."""

    custom_id: CustomId
    method: Literal["POST"]
    url: Literal["/v1/images/generations"]
    body: dict[str, Any]


class ImageBody(_Strict):
    """The body of one image request: OpenAI's fields that apply, and aigc's own."""

    prompt: str | None = Field(None, max_length=32_000)  # ignored by unconditional GANs
    model: Any = None  # ignored: the job's model makes every image
    user: Any = None
    n: int = Field(1, ge=1, le=256)
    size: ImageSize | None = None
    response_format: Literal["url"] | None = None
    output_format: Literal["png"] | None = None
    quality: Literal["auto", "standard"] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    label: ShortText | None = None
    grid: bool = False


def read_openai_images(stream: Any, kind: Kind | str = IMAGES_KIND, *,
                       endpoint: str | None = IMAGES_URL) -> Any:
    """Yield ``(line, record_or_Problem)`` per line of an image batch file (``image_set``)."""
    if Kind(kind) is not IMAGES_KIND:
        raise ValueError(f"image lines make image_set items, not {kind}")
    spec = SPECS[IMAGES_KIND]
    for line, obj in read_jsonl(stream):
        if isinstance(obj, Problem):
            yield line, obj
        elif not isinstance(obj, dict):
            yield line, Problem(line, "-", f"expected a JSON object, got {type(obj).__name__}", "invalid_json")
        elif endpoint is not None and isinstance(obj.get("url"), str) and obj["url"] != endpoint:
            yield line, Problem(line, "url", f"must be the batch's endpoint {endpoint}; got "
                                f"{obj.get('url')!r}", "mismatched_endpoint")
        else:
            checked = _checked(line, obj, spec)
            yield from ((line, p) for p in checked) if isinstance(checked, list) else [(line, checked)]


def _checked(line: int, obj: dict[str, Any], spec: type[BaseModel]) -> dict[str, Any] | list[Problem]:
    try:
        request = ImageLine.model_validate(obj)
    except ValidationError as exc:
        return list(problems_from(line, exc, messages=LINE_MESSAGES))
    try:
        body = ImageBody.model_validate(request.body)
    except ValidationError as exc:
        return list(problems_from(line, exc, prefix="body", messages=BODY_MESSAGES))
    record = {"custom_id": request.custom_id, "n_images": body.n, "seed": body.seed,
              "label": body.label, "grid": body.grid, "size": body.size}
    record = {k: v for k, v in record.items() if v is not None}
    try:
        spec.model_validate(record)
    except ValidationError as exc:  # the spec's field names are the body's, but for n
        return [Problem(p.line, "body." + ("n" if p.field == "n_images" else p.field), p.message, p.code)
                for p in problems_from(line, exc)]
    return record
