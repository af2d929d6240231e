"""Example inputs for any Hugging Face model (or plain torch module), built from the model itself.

What to build comes from the model's ``main_input_name``, its config and its forward signature: token
ids (within the position tables, pad id avoided), decoder ids for encoder-decoders, Whisper features,
raw audio, images and video. Nothing is passed that the forward does not take. Used for tracing (the
norm map), for verification and for fold-bn.

>>> import transformers as T
>>> cfg = T.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
>>> x = example_inputs(T.T5ForConditionalGeneration(cfg), seq_len=5)
>>> {k: tuple(v.shape) if hasattr(v, "shape") else v for k, v in x.items()}
{'input_ids': (1, 5), 'decoder_input_ids': (1, 5), 'use_cache': False}
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from normsurgeon.errors import InputError

CNN_IMAGE_SIZE = 64  # vision configs without an image size (ResNet, ...): any size the strides allow


def forward_params(model: torch.nn.Module) -> dict[str, inspect.Parameter]:
    """The named parameters of ``model.forward`` (``*args`` / ``**kwargs`` left out)."""
    params = inspect.signature(model.forward).parameters
    return {k: p for k, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes an argument called ``name``."""
    return name in forward_params(model)


def example_inputs(model: torch.nn.Module, *, batch: int = 1, seq_len: int = 8, seed: int = 0,
                   dtype: torch.dtype | None = None, image_size: int | list[int] | None = None) -> dict[str, Any]:
    """Keyword inputs for ``model(**x)``: seeded, ``batch`` rows, ``use_cache=False`` where taken.

    ``seq_len`` is the token length (clamped to the position tables) or, for raw audio, the number of
    feature frames; ``image_size`` (int or [H, W]) replaces the config's. A plain torch module is asked
    for its ``example_inputs()`` (under ``seed``).

    >>> import transformers as T
    >>> cfg = T.RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                       intermediate_size=32, max_position_embeddings=10, pad_token_id=1)
    >>> m = T.RobertaModel(cfg).eval()
    >>> x = example_inputs(m, batch=2, seq_len=100)
    >>> x["input_ids"].shape, bool((x["input_ids"] != 1).all())  # 8 = 10 positions - (pad 1 + 1)
    (torch.Size([2, 8]), True)
    >>> m(**x).last_hidden_state.shape
    torch.Size([2, 8, 16])
    """
    x = _build(model, batch, seq_len, seed, dtype, image_size)
    if getattr(model, "config", None) is not None and accepts(model, "use_cache"):
        x["use_cache"] = False
    return x


def random_batches(model: torch.nn.Module, num: int, seq_len: int, seed: int, *,
                   dtype: torch.dtype | None = None, image_size: int | list[int] | None = None) -> list[dict[str, Any]]:
    """Verification inputs: one seeded batch of ``num`` rows (no ``use_cache``: the runner decides).

    >>> import transformers as T
    >>> cfg = T.ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1,
    ...                   num_attention_heads=2, intermediate_size=32)
    >>> [tuple(v.shape) for v in random_batches(T.ViTModel(cfg), 3, 64, seed=0)[0].values()]
    [(3, 3, 8, 8)]
    """
    return [_build(model, num, seq_len, seed, dtype, image_size)]


def max_seq_len(model: torch.nn.Module) -> int | None:
    """The longest token sequence the model's position limits allow (``None``: no limit found).

    Learned tables count their offset (OPT, BART: ``offset``) and, where positions start after the pad
    id (RoBERTa, XLM-R, ESM: ``padding_idx + 1 + position``), ``padding_idx + 1``.

    >>> import transformers as T
    >>> cfg = T.OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                   ffn_dim=32, word_embed_proj_dim=16, max_position_embeddings=12)
    >>> max_seq_len(T.OPTModel(cfg))
    12
    """
    cfg = model.config
    keys = ("max_position_embeddings", "n_positions", "max_target_positions", "max_seq_len", "n_ctx",
            "max_sequence_length")  # MPT: max_seq_len (ALiBi), CTRL: n_ctx
    limits = [v for v in (getattr(cfg, k, None) for k in keys) if isinstance(v, int) and v > 0]
    # Tables indexed by token positions: the whole model for text, the decoder when it reads features.
    scope = model if model.main_input_name == "input_ids" else _decoder(model) or model
    for name, mod in scope.named_modules():
        if isinstance(mod, torch.nn.Embedding) and "pos" in name.rsplit(".", 1)[-1]:
            pad = mod.padding_idx
            limits.append(mod.num_embeddings - getattr(mod, "offset", 0) - (pad + 1 if pad is not None else 0))
    return min(limits) if limits else None


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------

def _build(model, batch, seq_len, seed, dtype, image_size) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    cfg = getattr(model, "config", None)
    if cfg is None:
        return _plain(model, seed, dtype)
    dtype = dtype or _float_dtype(model)
    main = getattr(model, "main_input_name", "input_ids")
    params = forward_params(model)
    if main not in params:
        raise InputError(f"cannot build example inputs for {type(model).__name__}: its forward takes no `{main}`")
    limit = max_seq_len(model)
    tokens = min(seq_len, limit) if limit else seq_len
    if main == "input_ids":
        x = {"input_ids": _token_ids(model, cfg, batch, tokens, gen)}
    elif main == "pixel_values":
        x = {"pixel_values": _pixels(cfg, batch, image_size, gen, dtype)}
    elif main == "input_features":
        x = {"input_features": _features(model, cfg, batch, gen, dtype)}
    elif main == "input_values":
        x = {"input_values": _audio(model, cfg, batch, seq_len, gen, dtype)}
    else:
        raise InputError(f"cannot build example inputs for {type(model).__name__}: unknown main input `{main}`")
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        x["decoder_input_ids"] = _decoder_ids(model, cfg, batch, tokens, gen)
    for name, p in params.items():  # arguments the forward cannot do without (HF ones default to None)
        if name in x or p.default is not p.empty:
            continue
        if name == "attention_mask" and "input_ids" in x:
            x[name] = torch.ones_like(x["input_ids"])  # [B, S]: every token is real
        elif name == "token_type_ids" and "input_ids" in x:
            x[name] = torch.zeros_like(x["input_ids"])  # [B, S]: one segment
        else:
            raise InputError(f"cannot build example inputs for {type(model).__name__}: its forward requires `{name}`")
    return x


def _plain(model, seed, dtype) -> dict[str, Any]:
    """A plain torch module's own ``example_inputs()``, run under ``seed``, keyed by forward argument."""
    factory = getattr(model, "example_inputs", None)
    if not callable(factory):
        raise InputError(f"cannot build example inputs for {type(model).__name__}: a plain torch module needs "
                         "an `example_inputs()` method")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ex = factory()
    if not isinstance(ex, dict):
        ex = dict(zip(forward_params(model), ex if isinstance(ex, (tuple, list)) else (ex,)))
    if dtype is not None:
        ex = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in ex.items()}
    return ex


def _float_dtype(model) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None and p.dtype.is_floating_point else torch.float32


def _randn(shape, gen, dtype) -> torch.Tensor:
    # Drawn in float32 and cast: the same values (up to rounding) whatever the model's dtype.
    return torch.randn(shape, generator=gen).to(dtype)


def _decoder(model) -> torch.nn.Module | None:
    get = getattr(model, "get_decoder", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def _vocab(module, cfg, key: str = "vocab_size") -> int | None:
    try:
        emb = module.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    n = getattr(emb, "num_embeddings", None)
    return n if isinstance(n, int) else getattr(cfg, key, None)


def _random_ids(vocab: int, pad: int | None, shape, gen) -> torch.Tensor:
    """Uniform ids in [0, vocab) without ``pad`` (positions and masks are derived from it)."""
    skip = isinstance(pad, int) and 0 <= pad < vocab and vocab > 1
    ids = torch.randint(0, vocab - skip, shape, generator=gen)
    return ids + (ids >= pad).long() if skip else ids


def _token_ids(model, cfg, batch, seq_len, gen) -> torch.Tensor:
    vocab = _vocab(model, cfg)
    if not vocab:
        raise InputError(f"cannot build example inputs for {type(model).__name__}: no vocabulary size "
                         "(config `vocab_size` or an input embedding)")
    return _random_ids(vocab, getattr(cfg, "pad_token_id", None), (batch, seq_len), gen)  # [B, S]


def _decoder_ids(model, cfg, batch, seq_len, gen) -> torch.Tensor:
    """[B, S] decoder ids starting with ``decoder_start_token_id`` (the rest random, pad avoided)."""
    gen_cfg = getattr(model, "generation_config", None)
    start = next((v for v in (getattr(cfg, "decoder_start_token_id", None),
                              getattr(gen_cfg, "decoder_start_token_id", None),
                              getattr(cfg, "bos_token_id", None), getattr(cfg, "pad_token_id", None))
                  if isinstance(v, int)), 0)
    vocab = _vocab(_decoder(model) or model, cfg, "decoder_vocab_size") or _vocab(model, cfg)
    if not vocab:
        raise InputError(f"cannot build example inputs for {type(model).__name__}: no decoder vocabulary size")
    ids = _random_ids(vocab, getattr(cfg, "pad_token_id", None), (batch, seq_len), gen)
    ids[:, 0] = start
    return ids


def _pixels(cfg, batch, image_size, gen, dtype) -> torch.Tensor:
    """[B, C, H, W] images, or [B, T, C, H, W] video where the config has ``num_frames``."""
    vision = getattr(cfg, "vision_config", None)  # composite configs (SigLIP classifier) keep it there
    size = image_size or getattr(cfg, "image_size", None) or getattr(vision, "image_size", None) or CNN_IMAGE_SIZE
    h, w = (size, size) if isinstance(size, int) else (size[0], size[-1])
    shape = (getattr(cfg, "num_channels", None) or getattr(vision, "num_channels", None) or 3, h, w)
    frames = getattr(cfg, "num_frames", None)
    return _randn((batch, frames, *shape) if frames else (batch, *shape), gen, dtype)


def _features(model, cfg, batch, gen, dtype) -> torch.Tensor:
    """Whisper-style log-mel features [B, num_mel_bins, 2 * max_source_positions]: exactly that length."""
    bins, positions = getattr(cfg, "num_mel_bins", None), getattr(cfg, "max_source_positions", None)
    if not bins or not positions:
        raise InputError(f"cannot build example inputs for {type(model).__name__}: `input_features` needs "
                         "`num_mel_bins` and `max_source_positions` in the config")
    return _randn((batch, bins, 2 * positions), gen, dtype)


def _audio(model, cfg, batch, frames, gen, dtype) -> torch.Tensor:
    """Raw audio [B, samples] giving ``frames`` feature frames (Wav2Vec2, HuBERT), or a spectrogram
    [B, max_length, num_mel_bins] (AST)."""
    kernels, strides = getattr(cfg, "conv_kernel", None), getattr(cfg, "conv_stride", None)
    if kernels and strides:
        samples = frames
        for k, s in reversed(list(zip(kernels, strides))):  # invert L_out = (L_in - k) // s + 1
            samples = (samples - 1) * s + k
        return _randn((batch, samples), gen, dtype)
    if getattr(cfg, "max_length", None) and getattr(cfg, "num_mel_bins", None):
        return _randn((batch, cfg.max_length, cfg.num_mel_bins), gen, dtype)
    raise InputError(f"cannot build example inputs for {type(model).__name__}: `input_values` needs "
                     "`conv_kernel` / `conv_stride` (raw audio) or `max_length` / `num_mel_bins` in the config")
