"""The text backend: article and ad copy items → prompts → batched LM generation → rows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from schemas.enums import Kind
from schemas.settings import Settings
from schemas.specs import effective_params, n_outputs
from schemas.templates import parse_output, render_prompt

from .lm import CausalLM, TextOutput, TextRequest
from .registry import register
from .seeds import derive_seed

MAX_VARIANTS = 16  # request keys are item_position * MAX_VARIANTS + variant
VARIANT_TEMPERATURE = 0.8  # several variants of one item are sampled, never all greedy


@register(Kind.article, Kind.ad_copy)
class TextBackend:
    """Runs text kinds on one causal LM, loaded once per process."""

    def __init__(self, model: str, settings: Settings):
        self.settings = settings
        self.lm = CausalLM(model, allow_downloads=settings.allow_downloads)
        self.device = str(self.lm.device)
        self.memory_bytes = self.lm.memory_bytes

    def run(self, job: Any, items: list[Any]) -> Iterator[list[dict[str, Any]]]:
        """Yield result rows (dicts for ``results``) as each batch finishes."""
        requests, plans = [], []
        for position, item in enumerate(items):
            params = effective_params(job.params, item.input)
            seed = params.seed if params.seed is not None else derive_seed(job.id, item.custom_id)
            variants = n_outputs(item.input)
            if variants > 1 and params.temperature == 0:
                params = params.model_copy(update={"temperature": VARIANT_TEMPERATURE})
            prompt = render_prompt(job.kind, item.input)
            plans.append((item, params, seed, variants))
            requests += [TextRequest(position * MAX_VARIANTS + v, prompt, params, seed + v)
                         for v in range(variants)]
        pending: dict[int, list[TextOutput]] = {}
        for batch in self.lm.generate(requests, max_rows=self.settings.max_batch_rows,
                                      max_tokens=self.settings.max_batch_tokens):
            rows = []
            for output in batch:
                position = output.key // MAX_VARIANTS
                pending.setdefault(position, []).append(output)
                if len(pending[position]) == plans[position][3]:
                    rows.append(self._row(job, *plans[position], pending.pop(position)))
            if rows:
                yield rows

    def _row(self, job: Any, item: Any, params: Any, seed: int, variants: int,
             outputs: list[TextOutput]) -> dict[str, Any]:
        outputs.sort(key=lambda o: o.key)
        row = {
            "job_id": job.id, "item_id": item.id, "custom_id": item.custom_id, "kind": job.kind,
            "model": job.model, "seed": seed, "params": params.model_dump(mode="json"),
            "prompt_tokens": outputs[0].prompt_tokens,
            "output_tokens": sum(o.output_tokens for o in outputs),
            "latency_ms": max(o.latency_ms for o in outputs), "device": self.device,
        }
        failed = next((o for o in outputs if o.error_code), None)
        if failed:
            return row | {"error_code": failed.error_code, "error_message": failed.error_message}
        parsed = [parse_output(job.kind, item.input, o.text) for o in outputs]
        if variants == 1:
            output = parsed[0]
            text = outputs[0].text
            if "title" in output:
                text = f"{output['title']}\n\n{output['body']}".strip()
        else:
            output = {"variants": parsed}
            text = "\n\n".join(o.text.strip() for o in outputs)
        return row | {"output": output, "output_text": text}
