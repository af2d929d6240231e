"""Write a random Hugging Face checkpoint of a given shape straight to disk, shard by shard.

Nothing is ever built at full size: names and shapes come from the model on ``meta``; each tensor is
drawn, cast and written, and a shard is flushed as soon as it reaches ``--shard-size``.

    python benchmarks/make_synthetic.py opt-13b /work/bench/opt-13b --dtype bfloat16
    python benchmarks/make_synthetic.py gpt2 /work/bench/gpt2 --dtype float32
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    # GPT-2 small (124M): 12 layers, d 768, vocab 50257, tied head.
    "gpt2": {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024,
             "n_embd": 768, "n_layer": 12, "n_head": 12, "bos_token_id": 50256, "eos_token_id": 50256},
    # GPT-2 XL (1.56B): 48 layers, d 1600, 25 heads, tied head (3.1 GB in bfloat16).
    "gpt2-xl": {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024,
                "n_embd": 1600, "n_layer": 48, "n_head": 25, "bos_token_id": 50256, "eos_token_id": 50256},
    # OPT-1.3B: 24 layers, d 2048, ffn 8192, Pre-LN.
    "opt-1.3b": {"architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": 50272, "hidden_size": 2048,
                 "num_hidden_layers": 24, "num_attention_heads": 32, "ffn_dim": 8192, "max_position_embeddings": 2048,
                 "word_embed_proj_dim": 2048, "do_layer_norm_before": True, "pad_token_id": 1, "bos_token_id": 2,
                 "eos_token_id": 2},
    # OPT-13B: 40 layers, d 5120, ffn 20480, Pre-LN: 12.85B parameters (25.7 GB in bfloat16).
    "opt-13b": {"architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": 50272, "hidden_size": 5120,
                "num_hidden_layers": 40, "num_attention_heads": 40, "ffn_dim": 20480, "max_position_embeddings": 2048,
                "word_embed_proj_dim": 5120, "do_layer_norm_before": True, "pad_token_id": 1, "bos_token_id": 2,
                "eos_token_id": 2},
}


def make(shape: str, out: Path, dtype: torch.dtype, shard_bytes: int, seed: int = 0) -> dict:
    from normsurgeon.stream.skeleton import meta_model

    cfg = dict(SHAPES[shape])
    cfg["dtype"] = str(dtype).replace("torch.", "")
    model = meta_model(cfg)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    seen: set[int] = set()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names: list[tuple[str, list[str]]] = []
    total = 0
    files: list[str] = []

    def flush(final: bool) -> None:
        nonlocal size
        if not shards[-1]:
            return
        name = f"part-{len(files):05d}.safetensors"
        save_file(shards[-1], str(out / name), metadata={"format": "pt"})
        files.append(name)
        names.append((name, list(shards[-1])))
        shards[-1] = {}
        size = 0

    params = dict(model.named_parameters(remove_duplicate=False))
    for key, t in state.items():
        p = params.get(key)
        if p is not None and id(p) in seen:  # tied alias: not saved (as save_pretrained does)
            continue
        if p is not None:
            seen.add(id(p))
        if not t.dtype.is_floating_point:
            continue
        leaf = key.rsplit(".", 1)[-1]
        is_norm = "norm" in key or "ln_" in key or key.startswith("transformer.ln_f")
        if is_norm and leaf == "weight":
            v = 1 + 0.1 * torch.randn(t.shape, generator=gen)
        elif leaf == "bias":
            v = 0.02 * torch.randn(t.shape, generator=gen)
        else:
            v = 0.02 * torch.randn(t.shape, generator=gen)
        v = v.to(dtype)
        nb = v.numel() * v.element_size()
        if shards[-1] and size + nb > shard_bytes:
            flush(False)
        shards[-1][key] = v
        size += nb
        total += nb
    flush(True)
    n = len(files)
    weight_map = {}
    for i, (tmp, keys) in enumerate(names, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        (out / tmp).rename(out / final)
        weight_map.update({k: final for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return {"shape": shape, "bytes": total, "shards": n,
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--shard-size", type=float, default=2e9)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    info = make(a.shape, a.out, getattr(torch, a.dtype), int(a.shard_size))
    info["seconds"] = round(time.perf_counter() - t, 1)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
