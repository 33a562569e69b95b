"""Typed item specs per kind and the generation parameters: what a valid input looks like.

Every field is bounded so that a hostile or mistaken input is refused at submission with a
message naming the field, rather than failing (or costing hours) on a worker.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError,
    ValidationInfo, model_validator,
)
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


# Validation context of a CSV row: its cells are text (see :data:`CellList`).
CSV_CONTEXT = {"csv": True}


def _cell_list(value: Any, info: ValidationInfo) -> Any:
    """In a CSV cell a list is ``a;b;c`` (blank parts dropped) or a JSON array; elsewhere a
    string stays a string (and is refused: lists are JSON arrays there)."""
    if not isinstance(value, str) or not (info.context or {}).get("csv"):
        return value
    text = value.strip()
    if not text.startswith("["):
        return [part.strip() for part in text.split(";") if part.strip()]
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, list):
        raise PydanticCustomError("json_array", "not a JSON array")
    return parsed


CellList = BeforeValidator(_cell_list)


class _Strict(BaseModel):
    # allow_inf_nan=False: "nan" or a JSON NaN is not a temperature.
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, allow_inf_nan=False)


DEFAULT_MAX_NEW_TOKENS = 128  # free-form prompts and chat messages without a limit of their own
# An article of N words gets N x 1.4 + 24 new tokens unless max_new_tokens says otherwise: English
# runs about 1.3 tokens a word on GPT-2-style vocabularies, plus a title.
TOKENS_PER_WORD = 1.4
TITLE_TOKENS = 24
# Words each named article length means.
ARTICLE_LENGTHS = {"short": 150, "medium": 400, "long": 800}
# Templated items (articles, ad copy) discourage repeating what the model already wrote: small
# instruct models loop without it. Free-form prompts and chat lines get none unless asked.
TEMPLATE_REPETITION_PENALTY = 1.1


class GenerationParams(_Strict):
    """How text is sampled for one item, every value resolved (see :func:`effective_params`)."""

    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1, le=MAX_NEW_TOKENS)
    min_new_tokens: int = Field(0, ge=0, le=MAX_NEW_TOKENS, description="End of text is not "
                                "allowed before this many tokens.")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=1.0, le=2.0, description="Divides the scores of "
                                      "tokens already generated (1 = off); the prompt is exempt.")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[StopText] = Field(default_factory=list, max_length=8)
    n: int = Field(1, ge=1, le=10, description="Outputs for this item.")


class JobParams(_Strict):
    """A job's generation parameters as given: unset fields fall back per item and kind."""

    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description="Default: "
                                       "from an article's length, an ad's max_chars, else 128.")
    min_new_tokens: int | None = Field(None, ge=0, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, ge=1.0, le=2.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Annotated[list[StopText], CellList] | None = Field(None, max_length=8)


class ItemParams(JobParams):
    """Per-item overrides of the job's generation parameters, and ``n`` outputs per item."""

    n: int | None = Field(None, ge=1, le=10, description="Outputs for this item (sampled).")


def _content_text(content: Any) -> Any:
    """A message's content as one string: OpenAI's list of ``{"type": "text", "text"}`` parts
    joined by newlines; any other part (image, audio, file) is refused, naming it."""
    if not isinstance(content, list):
        return content
    texts = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise PydanticCustomError(
                "content_part", "part {number} is {kind}: only text parts are supported (the "
                "model reads text only)", {"number": number, "kind": repr(kind) if kind else
                                           "not a {\"type\": \"text\", \"text\": ...} object"})
        if not isinstance(part.get("text"), str) or part.keys() - {"type", "text"}:
            raise PydanticCustomError("content_part", "part {number} must be "
                                      "{{\"type\": \"text\", \"text\": STRING}}", {"number": number})
        texts.append(part["text"])
    return "\n".join(texts)


class ChatMessage(_Strict):
    """A chat message: kept as a message and rendered by the model's own chat template."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, BeforeValidator(_content_text),
                       StringConstraints(max_length=MAX_PROMPT_CHARS), Clean]
    name: ShortText | None = None


def _field_error(spec: BaseModel, field: str, kind: str, message: str) -> ValidationError:
    """A validation error located at ``field`` (a model validator's own would name no field)."""
    error = PydanticCustomError(kind, message)
    return ValidationError.from_exception_data(
        type(spec).__name__, [InitErrorDetails(type=error, loc=(field,), input=None)])


def _require_unless_prompt(spec: _TextSpec, field: str) -> Any:
    """Fail on the missing ``field`` itself (so errors name it) unless a free prompt is given."""
    if getattr(spec, field) is None and spec.prompt is None and spec.messages is None:
        raise _field_error(spec, field, "missing", "Field required (or give a free-form 'prompt' "
                           "or chat 'messages')")
    return spec


class _TextSpec(_Strict):
    custom_id: CustomId | None = None
    prompt: PromptText | None = Field(None, description="Free-form prompt, sent as it is; "
                                      "replaces the template.")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, max_length=256, description="Chat messages, rendered by the model's "
        "chat template; replace the template.")
    params: ItemParams | None = None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "_TextSpec":
        if self.prompt is not None and self.messages is not None:
            raise _field_error(self, "messages", "conflict", "give a 'prompt' or 'messages', not both")
        if self.messages is not None:
            total = sum(len(m.content) for m in self.messages)
            if total > MAX_PROMPT_CHARS:
                raise _field_error(self, "messages", "too_long", f"messages hold {total} "
                                   f"characters; the limit is {MAX_PROMPT_CHARS}")
            if self.messages[-1].role == "assistant":
                raise _field_error(self, "messages", "last_message", "the last message must not "
                                   "be the assistant's: the model writes the next one")
        return self


def _article_length(value: Any) -> Any:
    if isinstance(value, str) and not value.strip().lstrip("+").isdigit():
        words = ARTICLE_LENGTHS.get(value.strip().lower())
        if words is None:
            raise PydanticCustomError("article_length", LENGTH_HELP + "; got {value}",
                                      {"value": repr(value)})
        return words
    return value


LENGTH_HELP = ("must be a number of words from 20 to 5000, or " + ", ".join(
    f"{name} (about {words} words)" for name, words in ARTICLE_LENGTHS.items()))


def _length_range(value: int) -> int:
    if not 20 <= value <= 5000:
        raise PydanticCustomError("article_length", LENGTH_HELP + "; got {value}", {"value": value})
    return value


ArticleLength = Annotated[int, BeforeValidator(_article_length), AfterValidator(_length_range)]


class ArticleSpec(_TextSpec):
    """An article: a title and body about ``topic``."""

    topic: ShortText | None = None
    keywords: Annotated[list[ShortText], CellList] = Field(default_factory=list, max_length=20)
    length: ArticleLength = Field(300, description="Target length in words (20-5000), or "
                                  "short, medium, long.")
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


# WIDTHxHEIGHT, as OpenAI writes image sizes ("1024x1024").
ImageSize = Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$")]


class ImageSetSpec(_Strict):
    """An image set: ``n_images`` images from one seed, optionally with a contact sheet."""

    custom_id: CustomId | None = None
    n_images: int = Field(4, ge=1, le=256)
    seed: int | None = Field(None, ge=0, lt=2**63)
    label: ShortText | None = None
    grid: bool = False
    size: ImageSize | None = Field(None, description="WIDTHxHEIGHT the images must have; the "
                                   "worker refuses the item if its model makes another size.")


def is_templated(item_input: dict[str, Any]) -> bool:
    """Whether the kind's template writes the prompt (no free-form ``prompt`` or ``messages``)."""
    return not item_input.get("prompt") and not item_input.get("messages")


def n_outputs(item_input: dict[str, Any]) -> int:
    """How many outputs an item asks for: ``params.n`` if set, else ad copy's ``n_variants``."""
    return int((item_input.get("params") or {}).get("n") or item_input.get("n_variants") or 1)


SPECS: dict[Kind, type[_Strict]] = {
    Kind.article: ArticleSpec,
    Kind.ad_copy: AdCopySpec,
    Kind.image_set: ImageSetSpec,
}


def chose_max_new_tokens(job_params: dict[str, Any], item_input: dict[str, Any]) -> bool:
    """Whether the job or the item set ``max_new_tokens`` (a kind's default was not used)."""
    return any((values or {}).get("max_new_tokens") is not None
               for values in (job_params, item_input.get("params")))


def kind_defaults(kind: Kind | str, item_input: dict[str, Any]) -> dict[str, Any]:
    """What an item of ``kind`` gets where neither it nor its job sets a parameter."""
    if not is_templated(item_input):
        return {}
    kind = Kind(kind)
    if kind is Kind.article:
        words = int(item_input.get("length", 300))
        return {"max_new_tokens": min(MAX_NEW_TOKENS, round(words * TOKENS_PER_WORD) + TITLE_TOKENS),
                "min_new_tokens": words // 2,  # never an empty body (at most half the budget)
                "repetition_penalty": TEMPLATE_REPETITION_PENALTY}
    if kind is Kind.ad_copy:  # three labelled lines within max_chars, ~4 characters a token
        return {"max_new_tokens": min(MAX_NEW_TOKENS, int(item_input.get("max_chars", 280)) // 3 + 24),
                "min_new_tokens": 8, "repetition_penalty": TEMPLATE_REPETITION_PENALTY}
    return {}


def effective_params(kind: Kind | str, job_params: dict[str, Any],
                     item_input: dict[str, Any]) -> GenerationParams:
    """The parameters one item runs with: the item's own, else the job's, else the kind's
    defaults for it (:func:`kind_defaults`), else :class:`GenerationParams`' (min capped at max)."""
    given = lambda values: {k: v for k, v in (values or {}).items() if v is not None}  # noqa: E731
    defaults = kind_defaults(kind, item_input)
    chosen = {**given(job_params), **given(item_input.get("params"))}
    merged = {**defaults, **chosen, "n": n_outputs(item_input)}
    params = GenerationParams.model_validate(merged)
    # A kind's floor never takes more than half of a budget; a floor someone chose is theirs.
    floor = params.min_new_tokens if "min_new_tokens" in chosen else min(
        params.min_new_tokens, params.max_new_tokens // 2)
    return params.model_copy(update={"min_new_tokens": min(floor, params.max_new_tokens)})
