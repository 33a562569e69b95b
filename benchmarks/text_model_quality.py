"""Quality figures of a text model trained by scripts/train_text_model.py.

Rebuilds the exact train/held-out split the model was trained with (from the
training_config.json saved next to the weights), then prints one JSON object:
held-out perplexity of the model, of an add-one-smoothed unigram fitted on the
training split (same tokens), bits per character, and the fraction of words
generated from fixed prompts that occur in the training text.

    python benchmarks/text_model_quality.py [workers/models/text-small]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

import train_text_model as ttm  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Evaluate the model directory given on the command line; print and return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", default=str(ROOT / "workers/models/text-small"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir)
    cfg = json.loads((model_dir / "training_config.json").read_text())
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, padding_side="left")
    load_s = time.perf_counter() - t0
    docs = ttm.load_documents(cfg["max_chars"])
    train_docs, heldout_docs = ttm.split_documents(docs, cfg["heldout_frac"], cfg["seed"])
    figures = ttm.evaluate(model, tokenizer, train_docs, heldout_docs, cfg["n_ctx"], cfg["seed"])
    result = {
        "model_dir": str(model_dir),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype),
        "load_seconds": round(load_s, 3),
        "python": sys.version.split()[0],
        "heldout_docs": len(heldout_docs),
        **figures,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
