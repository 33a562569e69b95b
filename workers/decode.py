"""Batched decoding that stops computing a row once it has ended.

``model.generate`` with static batching keeps every row of a batch in every forward pass until
the longest row ends: rows that wrote end-of-text, hit a stop string or their own token limit
are computed on as padding. :func:`decode` runs the same steps (prefill, then one token per
row per step through the model's KV cache, the caller's logits processors and stopping criteria)
but removes ended rows from the batch, the cache and the per-row processors as soon as they end,
so every step computes only rows that are still writing.

A row's tokens are the same as ``generate`` would give it: same positions (from the attention
mask, as ``generate`` computes them for left padding), same masks, same processors; tested
against ``generate`` and batched against alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessorList, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer

ROOM = 128  # cache positions a layer adds when full (and at least half its length)


@dataclass
class DecodeStats:
    """What a decode computed: ``rows x steps`` it ran, and the tokens rows kept."""

    prompt_tokens: int = 0  # real prompt tokens
    prompt_padded: int = 0  # rows x the batch's widest prompt
    decoded: int = 0  # row-steps computed after the prompt (what static batching would pad)
    kept: int = 0  # tokens rows wrote before they ended (end-of-text excluded)

    def add(self, other: "DecodeStats") -> None:
        for name in ("prompt_tokens", "prompt_padded", "decoded", "kept"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


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
        self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self.keys = self._keys[..., : self._filled, :]
            self.values = self._values[..., : self._filled, :]


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


def _keep(processors: Sequence, rows: torch.Tensor) -> None:
    for processor in processors:
        keep = getattr(processor, "keep", None)
        if keep is not None:
            keep(rows)


@torch.inference_mode()
def decode(model: torch.nn.Module, input_ids: torch.Tensor, attention: torch.Tensor, *,
           limits: Sequence[int], eos_id: int | None, processors: LogitsProcessorList,
           stopping: StoppingCriteriaList, stats: DecodeStats | None = None) -> list[list[int]]:
    """Each row's new tokens (end-of-text included where a row wrote it) for a left-padded batch.

    ``limits`` are the rows' own new-token limits. Tokens are chosen by argmax of the processed
    scores (a sampling processor leaves one finite score per row). Processors and criteria with
    per-row state expose ``keep(rows)``, called with the indices of the rows that go on.
    """
    rows, width = input_ids.shape  # (B, T)
    device = input_ids.device
    cache = new_cache(model.config)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding starts at 0
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=1)
    position = positions[:, -1:]  # (b, 1)
    live = torch.arange(rows, device=device)  # (b,) original row of each row still writing
    remaining = torch.tensor(limits, device=device)  # (b,) tokens each may still write
    sequences = input_ids  # (b, T + steps): what processors and stop strings look at
    new: list[list[int]] = [[] for _ in range(rows)]
    run = stats if stats is not None else DecodeStats()
    run.prompt_tokens += int(attention.sum())
    run.prompt_padded += rows * width
    while True:
        run.decoded += len(live)
        scores = processors(sequences, out.logits[:, -1].float())  # (b, V)
        tokens = scores.argmax(dim=-1)  # (b,)
        sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
        remaining -= 1
        ended = remaining <= 0
        if eos_id is not None:
            ended |= tokens == eos_id
        if stopping:
            ended |= stopping(sequences, scores).to(device)
        for row, token in zip(live.tolist(), tokens.tolist()):
            new[row].append(token)
        if bool(ended.all()):
            break
        if bool(ended.any()):
            going = (~ended).nonzero().squeeze(1)  # (b',)
            live, remaining, tokens = live[going], remaining[going], tokens[going]
            sequences, attention, position = sequences[going], attention[going], position[going]
            cache.batch_select_indices(going)
            _keep(processors, going)
            _keep(stopping, going)
        attention = torch.cat([attention, attention.new_ones(len(live), 1)], dim=-1)
        position = position + 1
        out = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=position,
                    cache=cache, use_cache=True)
    run.kept += sum(len(t) - (1 if eos_id is not None and t and t[-1] == eos_id else 0) for t in new)
    return new
