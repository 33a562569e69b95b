"""The text backend: article and ad copy items → prompts → batched LM generation → rows.

Templated items become chat messages where the model has a chat template (else one raw
prompt); free-form ``prompt`` items go as they are; ``messages`` items go through the chat
template. An item asking for several outputs (``n``, an ad's ``n_variants``) becomes one
request per variant, each with its own seed, and one result row once all are back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aigc.schemas.enums import Kind
from aigc.schemas.settings import Settings
from aigc.schemas.specs import GenerationParams, chose_max_new_tokens, effective_params, is_templated
from aigc.schemas.templates import is_empty, output_text, parse_output, render_messages, render_prompt

from .contract import ClaimedItem, JobInfo, ResultRow, result_row
from .lm import CausalLM, TextOutput, TextRequest
from .registry import register
from .seeds import derive_seed

VARIANT_TEMPERATURE = 0.8  # several variants of one item are sampled, never all greedy


@dataclass
class _Plan:
    """One item on its way: what it asked for, and its variants' outputs as they come back."""

    job: JobInfo
    item: ClaimedItem
    params: GenerationParams
    seed: int
    fit: bool  # max_new_tokens is a default, which may shrink to fit the model's context
    outputs: list[TextOutput] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.outputs) == self.params.n


@register(Kind.article, Kind.ad_copy)
class TextBackend:
    """Runs text kinds on one causal LM, loaded once per process."""

    winds_down_on_shutdown = True  # its LM starts no row once the worker stops (workers/shutdown.py)

    def __init__(self, model: str, settings: Settings) -> None:
        self.settings = settings
        self.lm = CausalLM(model, allow_downloads=settings.allow_downloads,
                           models_dir=settings.models_dir, precision=settings.text_precision)
        self.device = str(self.lm.device)
        self.memory_bytes = self.lm.memory_bytes

    def run(self, job: JobInfo, items: list[ClaimedItem]) -> Iterator[list[ResultRow]]:
        """Yield the rows of the items whose variants are all back, as rows finish."""
        return self.run_jobs([(job, items)])

    def run_jobs(self, parts: Sequence[tuple[JobInfo, list[ClaimedItem]]],
                 more: Callable[[int], Sequence[tuple[JobInfo, list[ClaimedItem]]]] | None = None
                 ) -> Iterator[list[ResultRow]]:
        """:meth:`run` for the items of several jobs in shared batches; ``more(rows free)``
        gives items of other jobs that have arrived since, which join the running batch."""
        plans: list[_Plan] = []

        def requests(parts: Sequence[tuple[JobInfo, list[ClaimedItem]]]) -> list[TextRequest]:
            made = []
            for job, items in parts:
                for item in items:
                    plan = self._plan(job, item)
                    position = len(plans)
                    plans.append(plan)
                    made += [self._request(job.kind, item.input, (position, v), plan)
                             for v in range(plan.params.n)]
            return made

        joined = None if more is None else (lambda room: requests(more(room)))
        for batch in self.lm.generate(requests(parts), max_rows=self.settings.max_batch_rows,
                                      max_tokens=self.settings.max_batch_tokens, more=joined):
            rows = []
            for output in batch:
                plan = plans[output.key[0]]
                plan.outputs.append(output)
                if plan.complete:
                    rows.append(self._row(plan))
            if rows:
                yield rows

    def _plan(self, job: JobInfo, item: ClaimedItem) -> _Plan:
        params = effective_params(job.kind, job.params, item.input)
        seed = params.seed if params.seed is not None else derive_seed(job.id, item.custom_id)
        if params.n > 1 and params.temperature == 0:
            params = params.model_copy(update={"temperature": VARIANT_TEMPERATURE})
        return _Plan(job, item, params, seed, fit=not chose_max_new_tokens(job.params, item.input))

    def _request(self, kind: str, spec: dict[str, Any], key: tuple[int, int], plan: _Plan) -> TextRequest:
        """Variant ``key[1]`` of an item: templated items as chat messages where the model has
        a chat template (else the raw template), free-form prompts and messages as given."""
        seed, common = plan.seed + key[1], {"params": plan.params, "fit": plan.fit}
        if not is_templated(spec):
            return TextRequest(key, spec.get("prompt") or "", seed=seed,
                               messages=spec.get("messages"), **common)
        if self.lm.has_chat_template:
            messages, prefix = render_messages(kind, spec)
            return TextRequest(key, "", seed=seed, messages=messages, prefix=prefix, **common)
        return TextRequest(key, render_prompt(kind, spec), seed=seed, **common)

    def _row(self, plan: _Plan) -> ResultRow:
        job = plan.job
        outputs = sorted(plan.outputs, key=lambda o: o.key)
        used = max((o.params or plan.params for o in outputs), key=lambda p: p.max_new_tokens)
        item = plan.item
        made = {
            "seed": plan.seed, "params": used.model_dump(mode="json") | {"precision": self.lm.precision},
            "prompt_tokens": outputs[0].prompt_tokens,
            "output_tokens": sum(o.output_tokens for o in outputs),
            "latency_ms": max(o.latency_ms for o in outputs), "device": self.device,
        }
        failed = next((o for o in outputs if o.error_code), None)
        if failed:
            return result_row(job, item, **made, error_code=failed.error_code,
                              error_message=failed.error_message)
        parsed = [parse_output(job.kind, item.input, o.text, o.finish_reason == "length")
                  for o in outputs]
        empty = [n for n, p in enumerate(parsed, 1) if is_templated(item.input) and is_empty(job.kind, p)]
        if empty:
            which = "its output" if len(parsed) == 1 else f"variant(s) {', '.join(map(str, empty))} of {len(parsed)}"
            return result_row(job, item, **made, error_code="empty_output",
                              error_message=f"the model wrote nothing usable for {which}")
        finish = "length" if any(o.finish_reason == "length" for o in outputs) else "stop"
        texts = [output_text(job.kind, p) for p in parsed]
        if len(outputs) == 1:
            output, text = parsed[0], texts[0]
        else:
            output = {"variants": [p | {"text": t, "finish_reason": o.finish_reason}
                                   for p, t, o in zip(parsed, texts, outputs)]}
            text = "\n\n".join(t.strip() for t in texts)
        return result_row(job, item, **made, output=output, output_text=text, finish_reason=finish)
