"""Tiny randomised Llama / GPT-2 / Qwen3 / GPT-J models for the placement tests (float64, norms perturbed)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_zoo import randomise  # noqa: E402

L = 4


def llama(layers: int = L, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        bos_token_id=0, eos_token_id=0)
    return randomise(T.LlamaForCausalLM(cfg)).to(dtype)


def gpt2(layers: int = L, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=layers, n_head=4, bos_token_id=0,
                       eos_token_id=0)
    return randomise(T.GPT2LMHeadModel(cfg)).to(dtype)


def qwen3(layers: int = 2, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = T.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                        bos_token_id=0, eos_token_id=0)
    return randomise(T.Qwen3ForCausalLM(cfg)).to(dtype)


def gptj(layers: int = 2, dtype=torch.float64) -> torch.nn.Module:
    """A parallel block (attention and MLP read one LayerNorm)."""
    torch.manual_seed(0)
    cfg = T.GPTJConfig(vocab_size=64, n_positions=64, n_embd=32, n_layer=layers, n_head=4, rotary_dim=4,
                       bos_token_id=0, eos_token_id=0)
    return randomise(T.GPTJForCausalLM(cfg)).to(dtype)


def ids(n: int = 4, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def token_rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1).sqrt()


def block_outputs(model: torch.nn.Module, blocks, x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    hs = [b.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)) for b in blocks]
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
    for h in hs:
        h.remove()
    return outs
