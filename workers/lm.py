"""A Hugging Face causal language model, loaded once, run in length-bucketed batches.

Any causal LM directory works (``AutoModelForCausalLM`` + ``AutoTokenizer``): the small model
shipped in ``workers/models/text-small``, a local directory, or a hub id already in the local
Hugging Face cache. Nothing is downloaded unless ``AIGC_ALLOW_DOWNLOADS`` is set.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from schemas.specs import GenerationParams

from .errors import ModelNotFoundError, halve_after_out_of_memory
from .registry import module_bytes

log = logging.getLogger("aigc.worker")

BUILTIN_MODELS = {"text-small": Path(__file__).parent / "models" / "text-small"}


@dataclass(frozen=True)
class TextRequest:
    """One sequence to generate. ``key`` is the caller's handle for it."""

    key: int
    prompt: str
    params: GenerationParams
    seed: int


@dataclass(frozen=True)
class TextOutput:
    key: int
    text: str | None
    prompt_tokens: int
    output_tokens: int
    latency_ms: float
    error_code: str | None = None
    error_message: str | None = None


def resolve_model(ref: str, *, allow_downloads: bool = False) -> str:
    """A local directory for model ``ref``; :class:`ModelNotFoundError` naming it if none."""
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


def plan_batches(lengths: Sequence[int], max_new_tokens: int, max_rows: int,
                 max_tokens: int, bucketing: bool = True) -> list[list[int]]:
    """Split indices into batches of similar prompt length (bucketing) within row/token limits.

    A batch costs rows x (longest prompt + new tokens) padded tokens; that stays under
    ``max_tokens`` unless a single row already exceeds it. ``bucketing=False`` keeps the
    submission order (the benchmark's baseline).
    """
    batches: list[list[int]] = []
    batch: list[int] = []
    width = 0
    order = range(len(lengths))
    for index in sorted(order, key=lambda i: lengths[i]) if bucketing else order:
        width = max(width if batch else 0, lengths[index] + max_new_tokens)
        if batch and (len(batch) >= max_rows or (len(batch) + 1) * width > max_tokens):
            batches.append(batch)
            batch = []
            width = lengths[index] + max_new_tokens
        batch.append(index)
    if batch:
        batches.append(batch)
    return batches


class CausalLM:
    """A loaded model and tokenizer on this process's device."""

    def __init__(self, ref: str, *, allow_downloads: bool = False, device: str | None = None):
        self.ref = ref
        self.path = resolve_model(ref, allow_downloads=allow_downloads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.float32
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, padding_side="left",
                                                       local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype,
                                                          local_files_only=True)
        self.model.to(self.device).eval()
        self.memory_bytes = module_bytes(self.model)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        config = self.model.config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 1024)
        self.rows_cap: int | None = None  # lowered when a batch ran out of memory

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]

    def generate(self, requests: Sequence[TextRequest], *, max_rows: int, max_tokens: int,
                 bucketing: bool = True) -> Iterator[list[TextOutput]]:
        """Yield outputs batch by batch; requests sharing sampling params share batches."""
        encoded = self.encode([r.prompt for r in requests])
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            p = request.params
            limit = self.context - p.max_new_tokens
            if not 0 < len(encoded[i]) <= limit:
                yield [TextOutput(request.key, None, len(encoded[i]), 0, 0.0, "prompt_too_long",
                                  f"prompt is {len(encoded[i])} tokens; with max_new_tokens="
                                  f"{p.max_new_tokens} the model's context of {self.context} "
                                  f"allows at most {max(limit, 0)}")]
                continue
            key = (p.max_new_tokens, p.min_new_tokens, p.temperature, p.top_p, tuple(p.stop))
            groups.setdefault(key, []).append(i)
        for (max_new, *_), members in groups.items():
            lengths = [len(encoded[i]) for i in members]
            rows = min(max_rows, self.rows_cap or max_rows)
            for batch in plan_batches(lengths, max_new, rows, max_tokens, bucketing):
                chosen = [members[j] for j in batch]
                yield from self._run_adaptive([requests[i] for i in chosen], [encoded[i] for i in chosen])

    def _run_adaptive(self, requests: list[TextRequest], ids: list[list[int]]) -> Iterator[list[TextOutput]]:
        """Run a batch; on out-of-memory halve it, retry, and remember the smaller size.

        A single row that does not fit raises :class:`TransientError`: another attempt (later,
        or on a worker with a larger device) may succeed.
        """
        try:
            yield self._run_batch(requests, ids)
            return
        except torch.OutOfMemoryError:
            half = halve_after_out_of_memory(self.device, len(requests), "row")
        self.rows_cap = half
        log.warning("out of memory at %d rows; retrying as batches of at most %d", len(requests), half)
        yield from self._run_adaptive(requests[:half], ids[:half])
        yield from self._run_adaptive(requests[half:], ids[half:])

    @torch.inference_mode()
    def _run_batch(self, requests: list[TextRequest], ids: list[list[int]]) -> list[TextOutput]:
        """One padded forward pass over ``requests`` (left padding: prompts end together)."""
        params = requests[0].params
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)  # (B, T)
        attention = torch.zeros((len(ids), width), dtype=torch.long)  # (B, T)
        for row, tokens in enumerate(ids):
            input_ids[row, width - len(tokens):] = torch.tensor(tokens)
            attention[row, width - len(tokens):] = 1
        kwargs = {}
        if params.temperature > 0:
            sampler = PerRowSampler([r.seed for r in requests], params.temperature, params.top_p, self.device)
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if params.min_new_tokens:
            kwargs["min_new_tokens"] = min(params.min_new_tokens, params.max_new_tokens)
        started = time.perf_counter()
        out = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
            max_new_tokens=params.max_new_tokens, do_sample=False, num_beams=1,
            pad_token_id=self.pad_id, eos_token_id=self.eos_id, **kwargs,
        )  # (B, T + new)
        latency_ms = (time.perf_counter() - started) * 1000
        outputs = []
        for row, request in enumerate(requests):
            new = out[row, width:].tolist()
            if self.eos_id is not None and self.eos_id in new:
                new = new[: new.index(self.eos_id)]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            n_out = len(new)
            cut = min((text.find(s) for s in params.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
                n_out = len(self.encode([text])[0]) if text else 0
            outputs.append(TextOutput(request.key, text, len(ids[row]), n_out, latency_ms))
        return outputs
