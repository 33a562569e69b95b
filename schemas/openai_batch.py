"""OpenAI Batch API input lines for text (``/v1/chat/completions``, ``/v1/completions``), read
into records of a text kind: chat lines keep their ``messages``, completion lines their
``prompt``, and the sampling fields become ``params``.

Body fields that would change the output but cannot be honoured (``logprobs``, ``tools``, ...)
are refused unless left at OpenAI's neutral value; problems name the line's own fields
(``body.max_tokens``). What is supported: docs/openai-api.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Annotated, Any, BinaryIO, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .enums import Kind
from .parsing import Problem, problems_from, read_jsonl
from .specs import MAX_NEW_TOKENS, SPECS, ChatMessage, CustomId, StopText

Stream = BinaryIO | Iterable[bytes]
Records = Iterator[tuple[int, Any]]

OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")
OPENAI_KIND = Kind.article  # what an OpenAI Batch file runs as when no kind is named


class _OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchLine(_OpenAIModel):
    """One line of an OpenAI Batch input file."""

    custom_id: CustomId
    method: Literal["POST"]
    url: Literal["/v1/chat/completions", "/v1/completions"]
    body: dict[str, Any]


def _neutral(default: Any) -> Any:
    """A body field that changes the output unless left at OpenAI's neutral ``default``: a
    file written with every default spelled out is accepted; anything else cannot be honoured."""
    def check(value: Any) -> Any:
        if value is not None and value != default:
            raise PydanticCustomError("unsupported", "not supported")
        return value
    return Annotated[Any, AfterValidator(check)]


def _one_prompt(prompt: Any) -> Any:
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise PydanticCustomError("one_prompt", "a list of {n} prompts is not supported; "
                                      "put one prompt per line", {"n": len(prompt)})
        return prompt[0]
    if not isinstance(prompt, str):
        raise PydanticCustomError("prompt_type", "must be a string (or a list of one string)")
    return prompt


class _Body(_OpenAIModel):
    # About OpenAI's own service or bookkeeping; none of these changes the text. ``model`` is
    # ignored: the job's model runs every line.
    model: Any = None
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Annotated[list[StopText] | None, BeforeValidator(
        lambda v: [v] if isinstance(v, str) else v)] = Field(None, max_length=8)
    n: int | None = Field(None, ge=1, le=10)
    stream: _neutral(False) = None
    stream_options: _neutral(None) = None
    logprobs: _neutral(False) = None
    top_logprobs: _neutral(0) = None
    echo: _neutral(False) = None
    best_of: _neutral(1) = None
    logit_bias: _neutral({}) = None
    presence_penalty: _neutral(0) = None
    frequency_penalty: _neutral(0) = None
    suffix: _neutral(None) = None
    parallel_tool_calls: _neutral(None) = None
    modalities: _neutral(["text"]) = None

    @model_validator(mode="after")
    def _one_limit(self) -> "_Body":
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(
                type=PydanticCustomError("conflict", "conflicts with body.max_tokens"),
                loc=("max_completion_tokens",), input=self.max_completion_tokens)])
        return self

    def params(self) -> dict[str, Any]:
        """The sampling fields as an item's ``params``."""
        params = {"max_new_tokens": self.max_tokens or self.max_completion_tokens,
                  "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                  "stop": self.stop, "n": self.n}
        return {k: v for k, v in params.items() if v is not None}


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionBody(_Body):
    prompt: Annotated[str, BeforeValidator(_one_prompt)]


_BODIES = {"/v1/chat/completions": ChatBody, "/v1/completions": CompletionBody}
BODY_MESSAGES = {"extra_forbidden": "not supported", "missing": "required"}
LINE_MESSAGES = {"extra_forbidden": "not part of the OpenAI batch format",
                 "missing": "required in the OpenAI batch format"}
# Where an item field came from in the body, for problems the item's spec finds.
_SPEC_FIELDS = {"prompt": "body.prompt", "messages": "body.messages", "params": "body"}
_PARAM_FIELDS = {"max_new_tokens": "max_tokens"}


def read_openai_batch(stream: Stream, kind: Kind | str = OPENAI_KIND, *,
                      endpoint: str | None = None) -> Records:
    """Yield ``(line, record_or_Problem)`` per line of an OpenAI Batch API input file: chat
    lines as ``messages``, completion lines as a free-form ``prompt``, sampling as ``params``,
    for a text ``kind`` (article, ad_copy). With ``endpoint`` (a batch's), every line's ``url``
    must be that one, as OpenAI requires."""
    kind = Kind(kind)
    spec = SPECS[kind]
    for line, obj in read_jsonl(stream):
        if isinstance(obj, Problem):
            yield line, obj
        elif not kind.is_text:
            yield line, Problem(line, "-", f"the openai format is for text kinds (article, ad_copy), not {kind}")
        elif not isinstance(obj, dict):
            yield line, Problem(line, "-", f"expected a JSON object, got {type(obj).__name__}", "invalid_json")
        elif endpoint is not None and isinstance(obj.get("url"), str) and obj["url"] != endpoint:
            yield line, Problem(line, "url", f"must be the batch's endpoint {endpoint}; got "
                                f"{obj.get('url')!r}", "mismatched_endpoint")
        else:
            checked = _checked_record(line, obj, spec)
            yield from ((line, p) for p in checked) if isinstance(checked, list) else [(line, checked)]


def _checked_record(line: int, obj: dict[str, Any], spec: type[BaseModel]) -> dict[str, Any] | list[Problem]:
    """The line's item record, or its problems (each named by the line's own fields)."""
    try:
        request = BatchLine.model_validate(obj)
    except ValidationError as exc:
        return list(problems_from(line, exc, messages=LINE_MESSAGES))
    try:
        body = _BODIES[request.url].model_validate(request.body)
    except ValidationError as exc:
        return list(problems_from(line, exc, prefix="body", messages=BODY_MESSAGES))
    record = _record(request.custom_id, body)
    try:  # what the item's spec adds (sizes, the last message's role): named by body field
        spec.model_validate(record)
    except ValidationError as exc:
        return [_body_field(problem) for problem in problems_from(line, exc)]
    return record


def _body_field(problem: Problem) -> Problem:
    """A problem the item's spec found, renamed after the line's field it came from."""
    head, _, rest = problem.field.partition(".")
    if head == "params":
        name, _, rest = rest.partition(".")
        head, rest = "body", ".".join(filter(None, [_PARAM_FIELDS.get(name, name), rest]))
    field = ".".join(filter(None, [_SPEC_FIELDS.get(head, head), rest]))
    return Problem(problem.line, field, problem.message, problem.code)


def _record(custom_id: str, body: _Body) -> dict[str, Any]:
    """An item record from a validated body: its body is validated once (this is the hot path
    of large batch files)."""
    record: dict[str, Any] = {"custom_id": custom_id}
    if isinstance(body, ChatBody):
        record["messages"] = [m.model_dump(exclude_none=True) for m in body.messages]
    else:
        record["prompt"] = body.prompt
    params = body.params()
    return record | ({"params": params} if params else {})
