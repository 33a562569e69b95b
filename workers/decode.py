"""Continuous batched decoding: rows leave the batch as they end and new rows join it.

``model.generate`` with static batching keeps every row of a batch in every forward pass until
the longest row ends, and starts the next batch only then. :func:`decode` runs the same steps
(prefill, then one token per row per step through the model's KV cache) but

- removes a row from the batch, the cache and the per-row state as soon as it ends (end of
  text, a stop string or its own token limit), so every step computes only rows still writing;
- asks for new rows whenever there is room (``take``), prefills them on their own (in passes
  of similar length) and merges them into the running batch: their cache is left-padded to the batch's length (or the batch's
  to theirs), so a row that joins late computes exactly what it would have computed alone.

A row's tokens are the same as ``generate`` would give it: positions come from the attention
mask (as ``generate`` computes them for left padding), padding is masked, and the per-row
state (:class:`RowScores`: minimum length, repetition penalty on generated tokens, a sampling
generator seeded per row) moves with the row. Tested against ``generate``, batched against
alone, and joined late against joined at the start.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer

ROOM = 128  # cache positions a layer adds when full (and at least half its length)
TRIM = 64  # padding columns every row has before the cache drops them
PREFILL_TOKENS = 1024  # padded prompt tokens in one prefill pass
MIN_SHARED = 16  # prompt tokens rows prefilled together must share before the prefix runs once


@dataclass
class DecodeStats:
    """What a decode computed: ``rows x steps`` it ran, and the tokens rows kept."""

    prompt_tokens: int = 0  # real prompt tokens
    prompt_padded: int = 0  # rows x the widest prompt of the rows prefilled together
    decoded: int = 0  # row-steps computed after the prompt (what static batching would pad)
    kept: int = 0  # tokens rows wrote before they ended (end-of-text excluded)
    prefills: int = 0  # prefill passes: a batch starting, or rows joining a running one

    def add(self, other: "DecodeStats") -> None:
        for name in ("prompt_tokens", "prompt_padded", "decoded", "kept", "prefills"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class Row:
    """One sequence to decode. ``key`` is the caller's handle for it."""

    key: Hashable
    prompt: list[int]  # token ids, at least one
    limit: int  # most new tokens
    minimum: int = 0  # no end of text before this many
    seed: int = 0  # its sampling generator's seed (sampled rows)


@dataclass(frozen=True)
class Sampling:
    """What every row of one decode shares: how a token is chosen from the scores."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # on the row's generated tokens only: the prompt is exempt


class GrowingLayer(DynamicLayer):
    """A :class:`DynamicLayer` that writes each step into spare room instead of concatenating.

    ``DynamicLayer`` concatenates its whole cache with each new token, copying
    rows x heads x length x head_dim numbers per layer per step (on CPU, a quarter of a
    135M model's decode time at batch 20). Here the cache lives in a buffer with room to
    spare; ``keys``/``values`` are views of its filled part, so a step copies one position.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._filled, self._keys, self._values = 0, None, None
        start = self._filled
        end = start + key_states.shape[-2]
        if self._keys is None or end > self._keys.shape[-2]:
            capacity = end + max(ROOM, end // 2)
            self._keys = _regrow(self._keys, key_states, capacity, start)
            self._values = _regrow(self._values, value_states, capacity, start)
        self._keys[..., start:end, :] = key_states
        self._values[..., start:end, :] = value_states
        self._filled = end
        self._views()
        return self.keys, self.values

    def _views(self) -> None:
        self.keys, self.values = self._keys[..., : self._filled, :], self._values[..., : self._filled, :]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._views()

    def drop_front(self, columns: int) -> None:
        """Forget the first ``columns`` positions (padding in every row): a view, no copy."""
        self._keys, self._values = self._keys[..., columns:, :], self._values[..., columns:, :]
        self._filled -= columns
        self._views()

    def absorb(self, other: "GrowingLayer", pad_self: int, pad_other: int) -> None:
        """Append ``other``'s rows after this layer's, each left-padded with zeros (masked
        positions) by ``pad_self`` / ``pad_other`` so both end at the same position."""
        length = self._filled + pad_self
        mine, theirs = self._keys.shape[0], other._keys.shape[0]
        capacity = length + max(ROOM, length // 2)
        for name in ("_keys", "_values"):
            old, new = getattr(self, name), getattr(other, name)
            batch, heads, _, dim = old.shape
            merged = old.new_zeros(mine + theirs, heads, capacity, dim)  # (B, H, capacity, D)
            merged[:mine, :, pad_self:length] = old[..., : self._filled, :]
            merged[mine:, :, pad_other:length] = new[..., : other._filled, :]
            setattr(self, name, merged)
        self._filled = length
        self._views()


def _regrow(old: torch.Tensor | None, like: torch.Tensor, capacity: int, filled: int) -> torch.Tensor:
    """A buffer of ``capacity`` positions holding ``old``'s first ``filled``."""
    batch, heads, _, dim = like.shape
    room = like.new_empty(batch, heads, capacity, dim)  # (B, H, capacity, D)
    if old is not None and filled:
        room[..., :filled, :] = old[..., :filled, :]
    return room


def new_cache(config: Any) -> DynamicCache:
    """The model's dynamic cache, full-attention layers replaced by :class:`GrowingLayer`
    (sliding-window and other special layers are kept as transformers builds them)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = GrowingLayer
    return cache


def mergeable(cache: DynamicCache) -> bool:
    """Whether rows can join a running batch: every layer a :class:`GrowingLayer`."""
    return all(type(layer) is GrowingLayer for layer in cache.layers)


class RowScores:
    """Scores to tokens, row by row: no end of text before a row's minimum, the repetition
    penalty on the tokens the row generated, then greedy or sampling with the row's own
    ``torch.Generator`` (a row's tokens depend only on its seed, not on its batch)."""

    def __init__(self, sampling: Sampling, eos_id: int | None, device: torch.device):
        self.sampling, self.eos_id, self.device = sampling, eos_id, device
        self.minimums = torch.zeros(0, dtype=torch.long, device=device)  # (b,)
        self.written = torch.zeros(0, dtype=torch.long, device=device)  # (b,)
        self.seen: torch.Tensor | None = None  # (b, V) bool: tokens the row generated
        self.generators: list[torch.Generator] = []

    def add(self, rows: Sequence[Row]) -> None:
        self.minimums = torch.cat([self.minimums, torch.tensor([r.minimum for r in rows], device=self.device)])
        self.written = torch.cat([self.written, self.written.new_zeros(len(rows))])
        if self.seen is not None:
            self.seen = torch.cat([self.seen, self.seen.new_zeros(len(rows), self.seen.shape[1])])
        if self.sampling.temperature > 0:
            self.generators += [torch.Generator(device=self.device).manual_seed(r.seed) for r in rows]

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with ``rows`` only (the others ended)."""
        self.minimums, self.written = self.minimums[rows], self.written[rows]
        if self.seen is not None:
            self.seen = self.seen[rows]
        if self.generators:
            self.generators = [self.generators[i] for i in rows.tolist()]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of each row (b,) from its last logits (b, V)."""
        scores = logits.float()
        if self.eos_id is not None and bool((self.written < self.minimums).any()):
            scores[self.written < self.minimums, self.eos_id] = float("-inf")
        penalty = self.sampling.repetition_penalty
        if penalty != 1.0 and self.seen is not None:
            scores = torch.where(self.seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
        if self.sampling.temperature > 0:
            tokens = self._sample(scores)
        else:
            tokens = scores.argmax(dim=-1)
        if penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(scores.shape, dtype=torch.bool, device=self.device)
            self.seen[torch.arange(len(tokens), device=self.device), tokens] = True
        self.written += 1
        return tokens

    def _sample(self, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores / self.sampling.temperature, dim=-1)  # (b, V)
        if self.sampling.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > self.sampling.top_p  # keep the first
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return torch.cat([torch.multinomial(probs[row], 1, generator=gen)
                          for row, gen in enumerate(self.generators)])  # (b,)


@dataclass
class _Batch:
    """The rows decoding now, all tensors aligned on the row axis (b rows, L positions)."""

    cache: DynamicCache
    attention: torch.Tensor  # (b, L): 1 where a position holds a real token
    sequences: torch.Tensor  # (b, L): the tokens fed so far (padding included)
    position: torch.Tensor  # (b, 1): the position id of each row's last fed token
    remaining: torch.Tensor  # (b,): tokens each may still write
    keys: list[Hashable] = field(default_factory=list)

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.attention, self.sequences = self.attention[rows], self.sequences[rows]
        self.position, self.remaining = self.position[rows], self.remaining[rows]
        self.keys = [self.keys[i] for i in rows.tolist()]

    def absorb(self, other: "_Batch", pad_id: int) -> None:
        width, theirs = self.attention.shape[1], other.attention.shape[1]
        pad_self, pad_other = max(theirs - width, 0), max(width - theirs, 0)
        for mine, new in zip(self.cache.layers, other.cache.layers):
            mine.absorb(new, pad_self, pad_other)
        self.attention = torch.cat([_pad_left(self.attention, pad_self, 0), _pad_left(other.attention, pad_other, 0)])
        self.sequences = torch.cat([_pad_left(self.sequences, pad_self, pad_id),
                                    _pad_left(other.sequences, pad_other, pad_id)])
        self.position = torch.cat([self.position, other.position])
        self.remaining = torch.cat([self.remaining, other.remaining])
        self.keys += other.keys

    def trim(self) -> None:
        """Drop the leading columns that are padding in every row, once there are enough."""
        padding = int(self.attention.argmax(dim=1).min())  # each row's first real position
        if padding >= TRIM and mergeable(self.cache):
            for layer in self.cache.layers:
                layer.drop_front(padding)
            self.attention, self.sequences = self.attention[:, padding:], self.sequences[:, padding:]


def _pad_left(tensor: torch.Tensor, columns: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (columns, 0), value=value) if columns else tensor


Take = Callable[[int, int], Sequence[Row]]  # (rows running, their width) -> rows to join now


@torch.inference_mode()
def decode(model: torch.nn.Module, take: Take, *, sampling: Sampling, eos_id: int | None,
           pad_id: int, stopping: StoppingCriteriaList | None = None,
           stats: DecodeStats | None = None) -> Iterator[list[tuple[Hashable, list[int]]]]:
    """Yield ``(key, new tokens)`` of the rows that ended at each step where some did (end of
    text included where a row wrote it), until no row runs and ``take`` gives none.

    ``take(running, width)`` is asked before every step for rows to join; it decides how many
    fit (it may return none). Tokens are chosen by :class:`RowScores`; ``stopping`` criteria
    (stop strings) are stateless and look at each row's tokens so far.
    """
    device = next(model.parameters()).device
    run = stats if stats is not None else DecodeStats()
    scorer = RowScores(sampling, eos_id, device)
    batch: _Batch | None = None
    logits: torch.Tensor | None = None  # (b, V): each running row's next-token scores
    new: dict[Hashable, list[int]] = {}
    while True:
        joining = list(take(len(batch.keys) if batch else 0, batch.attention.shape[1] if batch else 0))
        if joining and batch is not None and not mergeable(batch.cache):
            raise ValueError("rows cannot join a batch whose cache has special layers")
        for part in _prefill_parts(joining):
            joined, joined_logits = _prefill(model, part, pad_id, device, run)
            scorer.add(part)
            for row in part:
                new[row.key] = []
            if batch is None:
                batch, logits = joined, joined_logits
            else:
                batch.absorb(joined, pad_id)
                logits = torch.cat([logits, joined_logits])
        if batch is None:
            return
        run.decoded += len(batch.keys)
        tokens = scorer(logits)  # (b,)
        batch.sequences = torch.cat([batch.sequences, tokens[:, None]], dim=-1)
        batch.attention = torch.cat([batch.attention, batch.attention.new_ones(len(tokens), 1)], dim=-1)
        batch.remaining -= 1
        ended = batch.remaining <= 0
        if eos_id is not None:
            ended |= tokens == eos_id
        if stopping:
            ended |= stopping(batch.sequences, logits).to(device)
        for key, token in zip(batch.keys, tokens.tolist()):
            new[key].append(token)
        if bool(ended.any()):
            done = [(key, new.pop(key)) for key, end in zip(batch.keys, ended.tolist()) if end]
            run.kept += sum(len(t) - (1 if eos_id is not None and t[-1] == eos_id else 0) for _, t in done)
            going = (~ended).nonzero().squeeze(1)  # (b',)
            tokens = tokens[going]
            if len(going):
                batch.select(going)
                scorer.keep(going)
            else:
                batch, logits = None, None
                scorer = RowScores(sampling, eos_id, device)
            yield done
            if batch is None:
                continue
        batch.trim()
        batch.position = batch.position + 1
        out = model(input_ids=tokens[:, None], attention_mask=batch.attention, position_ids=batch.position,
                    cache=batch.cache, use_cache=True)
        logits = out.logits[:, -1]


def _prefill_parts(rows: Sequence[Row]) -> list[list[Row]]:
    """``rows`` by prompt length, cut into passes of at most ``PREFILL_TOKENS`` padded tokens
    (at least one row each): one pass over 56 prompts of 61 to 151 tokens took 17 to 24 s on 2
    CPU cores, the same prompts in length-sorted passes of 8 rows 10 s."""
    parts: list[list[Row]] = []
    for row in sorted(rows, key=lambda r: len(r.prompt)):
        if parts and (len(parts[-1]) + 1) * len(row.prompt) <= PREFILL_TOKENS:
            parts[-1].append(row)
        else:
            parts.append([row])
    return parts


def _prefill(model: torch.nn.Module, rows: Sequence[Row], pad_id: int, device: torch.device,
             run: DecodeStats) -> tuple[_Batch, torch.Tensor]:
    """``rows`` through the model on their own: their batch and next-token logits.

    Prompts that start alike (a chat template's system prompt, an ad's worked example) share
    it: the common prefix runs once, its cache is copied to every row, and each row's own rest
    follows, left-padded after the prefix. Positions come from the mask, so a row's numbers are
    those of its whole prompt run at once.
    """
    shared = _common_prefix([r.prompt for r in rows]) if len(rows) > 1 else 0
    shared = shared if shared >= MIN_SHARED else 0
    rests = [r.prompt[shared:] for r in rows]
    width = max(map(len, rests))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (n, T)
    attention = torch.zeros((len(rows), shared + width), dtype=torch.long)  # (n, P + T)
    attention[:, :shared] = 1
    for i, rest in enumerate(rests):
        input_ids[i, width - len(rest):] = torch.tensor(rest)
        attention[i, shared + width - len(rest):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (n, P + T): padding takes its neighbour's
    cache = new_cache(model.config)
    if shared:
        prefix = torch.tensor([rows[0].prompt[:shared]], device=device)  # (1, P)
        model(input_ids=prefix, attention_mask=torch.ones_like(prefix), position_ids=positions[:1, :shared],
              cache=cache, use_cache=True, logits_to_keep=1)
        cache.batch_select_indices(torch.zeros(len(rows), dtype=torch.long, device=device))  # a copy per row
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions[:, shared:],
                cache=cache, use_cache=True, logits_to_keep=1)
    run.prompt_tokens += int(attention.sum())
    run.prompt_padded += shared + len(rows) * width
    run.prefills += 1
    sequences = torch.cat([torch.tensor([rows[0].prompt[:shared]] * len(rows), dtype=torch.long,
                                        device=device).reshape(len(rows), shared), input_ids], dim=1)
    remaining = torch.tensor([r.limit for r in rows], device=device)
    return _Batch(cache, attention, sequences, positions[:, -1:], remaining, [r.key for r in rows]), out.logits[:, -1]


def _common_prefix(prompts: Sequence[list[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each at least one of its own."""
    limit = min(map(len, prompts)) - 1
    first = prompts[0]
    for position in range(limit):
        token = first[position]
        if any(p[position] != token for p in prompts):
            return position
    return max(limit, 0)
