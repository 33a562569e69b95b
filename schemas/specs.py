"""Typed item specs per kind and the generation parameters: what a valid input looks like.

Every field is bounded so that a hostile or mistaken input is refused at submission with a
message naming the field, rather than failing (or costing hours) on a worker.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from .enums import Kind

MAX_NEW_TOKENS = 4096
MAX_PROMPT_CHARS = 32_000

# C0 controls but tab, newline and carriage return; DEL; C1 controls. NUL cannot even be stored
# in a PostgreSQL text column, and the rest only ever arrive by mistake or with bad intent.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _no_control_characters(value: str) -> str:
    found = _CONTROL.search(value)
    if found:
        raise PydanticCustomError(
            "control_character",
            "contains control character {code} at position {position}; only tab, newline "
            "and carriage return are allowed",
            {"code": f"U+{ord(found.group()):04X}", "position": found.start()})
    return value


Clean = AfterValidator(_no_control_characters)
ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500), Clean]
PromptText = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_PROMPT_CHARS), Clean
]
CustomId = Annotated[str, StringConstraints(min_length=1, max_length=255), Clean]
# Stop strings are taken as given: "\n" or "\nUser:" must keep their whitespace.
StopText = Annotated[str, StringConstraints(strip_whitespace=False, min_length=1, max_length=200), Clean]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class GenerationParams(_Strict):
    """How text is sampled. Set per job; an item may override any of them under ``params``."""

    max_new_tokens: int = Field(128, ge=1, le=MAX_NEW_TOKENS)
    min_new_tokens: int = Field(0, ge=0, le=MAX_NEW_TOKENS, description="End of text is not "
                                "allowed before this many tokens.")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[StopText] = Field(default_factory=list, max_length=8)


class ItemParams(_Strict):
    """Per-item overrides of the job's generation parameters, and ``n`` outputs per item."""

    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    min_new_tokens: int | None = Field(None, ge=0, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[StopText] | None = Field(None, max_length=8)
    n: int | None = Field(None, ge=1, le=10, description="Outputs for this item (sampled).")


class _TextSpec(_Strict):
    custom_id: CustomId | None = None
    prompt: PromptText | None = Field(None, description="Free-form prompt; replaces the template.")
    params: ItemParams | None = None


def _require_unless_prompt(spec: _TextSpec, field: str) -> Any:
    """Fail on the missing ``field`` itself (so errors name it) unless a free prompt is given."""
    if getattr(spec, field) is None and spec.prompt is None:
        error = PydanticCustomError("missing", "Field required (or give a free-form 'prompt')")
        raise ValidationError.from_exception_data(
            type(spec).__name__, [InitErrorDetails(type=error, loc=(field,), input=None)]
        )
    return spec


class ArticleSpec(_TextSpec):
    """An article: a title and body about ``topic``."""

    topic: ShortText | None = None
    keywords: list[ShortText] = Field(default_factory=list, max_length=20)
    length: int = Field(300, ge=20, le=5000, description="Target length in words.")
    tone: ShortText = "neutral"
    language: ShortText = "English"
    title: ShortText | None = None

    @model_validator(mode="after")
    def _topic_or_prompt(self) -> "ArticleSpec":
        return _require_unless_prompt(self, "topic")


class AdCopySpec(_TextSpec):
    """Ad copy: ``n_variants`` of (headline, body, call to action) for ``product``."""

    product: ShortText | None = None
    audience: ShortText = "general audience"
    channel: Literal["search", "social", "display", "email", "print"] = "social"
    tone: ShortText = "friendly"
    max_chars: int = Field(280, ge=20, le=5000)
    n_variants: int = Field(1, ge=1, le=10)

    @model_validator(mode="after")
    def _product_or_prompt(self) -> "AdCopySpec":
        return _require_unless_prompt(self, "product")


class ImageSetSpec(_Strict):
    """An image set: ``n_images`` images from one seed, optionally with a contact sheet."""

    custom_id: CustomId | None = None
    n_images: int = Field(4, ge=1, le=256)
    seed: int | None = Field(None, ge=0, lt=2**63)
    label: ShortText | None = None
    grid: bool = False


def n_outputs(item_input: dict[str, Any]) -> int:
    """How many outputs an item asks for: ``params.n`` if set, else ad copy's ``n_variants``."""
    return int((item_input.get("params") or {}).get("n") or item_input.get("n_variants") or 1)


SPECS: dict[Kind, type[_Strict]] = {
    Kind.article: ArticleSpec,
    Kind.ad_copy: AdCopySpec,
    Kind.image_set: ImageSetSpec,
}


def effective_params(job_params: dict[str, Any], item_input: dict[str, Any]) -> GenerationParams:
    """The job's parameters with the item's overrides applied (min capped at max)."""
    overrides = {k: v for k, v in (item_input.get("params") or {}).items()
                 if v is not None and k != "n"}
    params = GenerationParams.model_validate({**job_params, **overrides})
    return params.model_copy(update={"min_new_tokens": min(params.min_new_tokens, params.max_new_tokens)})
