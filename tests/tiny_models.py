"""Tiny random Llama (GQA) and GPT-NeoX (partial rotary) models, built in memory, for the
engine tests that need a model object rather than a folder (conftest's tiny_*_dir)."""

from __future__ import annotations

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

VOCAB = 97


def llama(layers=3, kv_heads=2, heads=4):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=37, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


def neox(layers=3, heads=4):
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=37, rotary_pct=0.25, max_position_embeddings=4096)
    return GPTNeoXForCausalLM(cfg).eval()


MODELS = {"llama": llama, "neox": neox}
