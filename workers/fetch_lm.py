"""A GGUF language model → a Hugging Face model folder (bf16 safetensors, tokenizer, template).

transformers reads GGUF itself (``from_pretrained(dir, gguf_file=...)``, with the ``gguf``
package): it dequantises every tensor and rebuilds the tokenizer and chat template from the
file's metadata. The loaded model still carries the GGUF quantizer, which makes
``save_pretrained`` refuse ("not serializable"); the weights are plain tensors by then, so the
quantizer is dropped before saving. The saved folder is then reloaded the way a worker loads it
and checked against the GGUF load: same prompt tokens, same next token, close logits.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from .fetch import FetchError, tensors_sha256

log = logging.getLogger("aigc.fetch")

# Dequantised weights rounded to bfloat16 move a logit by about 0.1 on SmolLM2; more means a
# broken conversion (a transposed or permuted tensor moves them by whole units).
LOGIT_TOLERANCE = 1.0
SOURCE = "source.json"  # provenance of the converted folder


def _prompt_ids(tokenizer: Any, message: str) -> list[int]:
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(message, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def _last_logits(model: Any, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1].float()  # (V,)


def convert_gguf(gguf: Path, target: Path, *, check_prompt: str,
                 provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the model in ``gguf`` to the folder ``target``; what was checked, as a dict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except ImportError as exc:  # the gguf package is a dependency of aigc; say so if missing
        raise FetchError(f"reading {gguf.name} needs the gguf package: {exc}") from None
    except Exception as exc:
        raise FetchError(f"transformers could not load {gguf.name}: {type(exc).__name__}: {exc}") from None
    model.eval()
    ids = _prompt_ids(tokenizer, check_prompt)
    reference = _last_logits(model, ids)

    model.hf_quantizer = None  # the weights are dequantised already; nothing is packed
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)

    reloaded_tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32, local_files_only=True)
    if _prompt_ids(reloaded_tokenizer, check_prompt) != ids:
        raise FetchError("the saved tokenizer (or chat template) does not reproduce the GGUF's "
                         "prompt tokens")
    if bool(reloaded_tokenizer.chat_template) != bool(tokenizer.chat_template):
        raise FetchError("the chat template was lost in the conversion")
    logits = _last_logits(reloaded.eval(), ids)
    difference = (logits - reference).abs().max().item()
    if logits.argmax() != reference.argmax() or difference > LOGIT_TOLERANCE:
        raise FetchError(f"the converted weights disagree with the GGUF (largest logit difference "
                         f"{difference:.3f}; next token {int(logits.argmax())} vs "
                         f"{int(reference.argmax())})")
    checked = {"gguf": gguf.name, "check_prompt": check_prompt, "prompt_tokens": len(ids),
               "next_token": int(reference.argmax()), "max_logit_difference": round(difference, 4),
               "parameters": sum(p.numel() for p in reloaded.parameters()),
               "tensors_sha256": tensors_sha256(reloaded.to(torch.bfloat16).state_dict()),
               "chat_template": bool(tokenizer.chat_template)}
    (target / SOURCE).write_text(json.dumps({**(provenance or {}), **checked}, indent=2) + "\n",
                                 encoding="utf-8")
    log.info("converted %s: %s", gguf.name, checked)
    return checked
