"""Write a placed model (stock Hugging Face class where one exists, else normsurgeon's own structure)
and load it back.

Stock targets (checked by loading the written folder with the stock class and comparing logits):

- Llama + Peri-LN (no embedding norm)  -> ``HyperCLOVAXForCausalLM(use_post_norm=True)``; Llama's keys
  plus ``post_norm1``/``post_norm2``;
- Llama + QK-norm (per head, Pre-LN)   -> ``Qwen3ForCausalLM`` (``self_attn.q_norm``/``k_norm``);
- unchanged Pre-LN                     -> the source class.

Everything else is written with ``model_type = normsurgeon_<type>`` (stock transformers refuses it
loudly) and a ``normsurgeon`` config section holding the placement spec; ``load_placed`` rebuilds it
from the source class plus ``normsurgeon.placement.runtime`` (no remote code).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from normsurgeon.errors import InputError
from normsurgeon.io.formats import CUSTOM_PREFIX
from normsurgeon.placement.spec import PlacementSpec

FORMAT = "placement"
_COMMON = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
           "tie_word_embeddings", "rope_parameters", "attention_bias", "attention_dropout", "head_dim",
           "bos_token_id", "eos_token_id", "pad_token_id")


def stock_target(source_cfg: dict, spec: PlacementSpec, family: str) -> str | None:
    """Name of the stock class that holds ``spec`` for this source, or None."""
    labels = {b.label for b in spec.blocks}
    plain = not spec.embedding_norm and not spec.final_dyt
    if labels == {"pre"} and plain and all(b.qk_norm == "keep" for b in spec.blocks):
        return (source_cfg.get("architectures") or [None])[0]
    if source_cfg.get("model_type") != "llama" or not plain:  # the stock targets hold Llama's keys
        return None
    if labels == {"peri"} and all(b.qk_norm == "keep" for b in spec.blocks):
        return "HyperCLOVAXForCausalLM"
    if labels == {"pre+qk"} and not source_cfg.get("mlp_bias"):
        return "Qwen3ForCausalLM"
    return None


def _stock_config(source_cfg: dict, target: str) -> dict:
    import transformers as T

    if target not in ("HyperCLOVAXForCausalLM", "Qwen3ForCausalLM"):
        return dict(source_cfg)  # unchanged Pre-LN: the source's own config
    fields = {k: source_cfg[k] for k in _COMMON if k in source_cfg}
    hd = fields.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"]
    if target == "HyperCLOVAXForCausalLM":
        cfg = T.HyperCLOVAXConfig(**fields, mlp_bias=source_cfg.get("mlp_bias", False), use_post_norm=True,
                                  embedding_multiplier=1.0, logits_scaling=1.0, residual_multiplier=1.0,
                                  attention_multiplier=hd ** -0.5)
    elif target == "Qwen3ForCausalLM":
        cfg = T.Qwen3Config(**fields, use_sliding_window=False)
    else:
        return dict(source_cfg)
    d = cfg.to_dict()
    d["architectures"] = [target]
    d["dtype"] = source_cfg.get("dtype", source_cfg.get("torch_dtype", "float32"))
    return d


def section(source_cfg: dict, family: str, spec: PlacementSpec, alpha0: float, stock: bool) -> dict:
    return {"format": FORMAT, "version": 1, "source_model_type": source_cfg.get("model_type"),
            "source_architecture": (source_cfg.get("architectures") or [None])[0], "family": family,
            "stock_loadable": stock, "alpha0": alpha0, "placement": spec.model_dump()}


def write_placed(model: torch.nn.Module, folder: Path, source_cfg: dict, family: str, spec: PlacementSpec,
                 alpha0: float, check_ids: torch.Tensor | None, max_shard_bytes: int = 5 * 10**9) -> dict:
    """Write weights + config into ``folder``; returns {"class", "stock", "check"}."""
    from normsurgeon.io.writer import write_safetensors

    state = model.state_dict()
    target = stock_target(source_cfg, spec, family)
    info: dict = {"stock": False, "class": None, "check": None}
    if target is not None:
        cfg = _stock_config(source_cfg, target)
        cfg["normsurgeon"] = section(source_cfg, family, spec, alpha0, True)
        write_safetensors(state, folder, max_shard_bytes)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        diff = _check_stock(model, folder, target, check_ids)
        if diff is not None and diff <= 1e-4:
            return {"stock": True, "class": target, "check": {"max_abs_logit_diff": diff}}
        for p in folder.iterdir():
            p.unlink()
        info["check"] = {"stock_class": target, "max_abs_logit_diff": diff, "fell_back": True}
    cfg = dict(source_cfg)
    cfg["model_type"] = CUSTOM_PREFIX + str(source_cfg.get("model_type"))
    cfg["normsurgeon"] = section(source_cfg, family, spec, alpha0, False)
    write_safetensors(state, folder, max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))  # the model card (README.md): run.py
    info["class"] = f"normsurgeon placed {(source_cfg.get('architectures') or ['?'])[0]}"
    return info


@torch.no_grad()
def _check_stock(model, folder: Path, target: str, ids: torch.Tensor | None) -> float | None:
    import transformers as T

    cls = getattr(T, target, None)
    if cls is None:
        return None
    T.utils.logging.set_verbosity_error()
    try:
        stock, report = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except Exception:  # noqa: BLE001 - any failure means: not stock-loadable, write the custom form
        return None
    if report.get("missing_keys") or report.get("unexpected_keys") or report.get("mismatched_keys"):
        return None
    stock.eval()
    ids = ids if ids is not None else torch.randint(0, stock.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    a = model(input_ids=ids, use_cache=False).logits.double()
    b = stock.to(next(model.parameters()).dtype)(input_ids=ids, use_cache=False).logits.double()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def _section(path: Path) -> dict | None:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        return None
    sec = json.loads(cfg_path.read_text()).get("normsurgeon")
    return sec if isinstance(sec, dict) and sec.get("format") == FORMAT else None


def is_placed_folder(ref: str | Path) -> bool:
    """True for folders written by ``place`` that need normsurgeon to load."""
    sec = _section(Path(ref)) if Path(ref).is_dir() else None
    return sec is not None and not sec.get("stock_loadable", False)


def load_placed(ref: str | Path):
    """Rebuild a custom placed folder: the source class from its config, the placement, then the weights."""
    from safetensors.torch import load_file

    from normsurgeon.io.loader import LoadedModel, source_model
    from normsurgeon.placement.anatomy import find_anatomy
    from normsurgeon.placement.runtime import install

    path = Path(ref)
    sec = _section(path)
    if sec is None:
        raise InputError(f"{path} is not a folder written by `normsurgeon place`")
    cfg = json.loads((path / "config.json").read_text())
    model = source_model(cfg, sec)
    cfg.pop("normsurgeon")
    cfg["model_type"] = sec["source_model_type"]
    model.eval()
    install(model, find_anatomy(model), PlacementSpec(**sec["placement"]), alpha0=sec.get("alpha0", 0.5))
    files = sorted(path.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if not state:
        raise InputError(f"no safetensors weights in {path}")
    dtype = next(iter(state.values())).dtype
    model.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"{path} does not match its placement ({len(missing)} missing, {len(unexpected)} "
                         f"unexpected tensors, e.g. {(missing or unexpected)[0]})")
    model.eval()
    return LoadedModel(model, str(ref), "folder", path, cfg, dtype, sec)


def load_form(req):
    """The ``placement`` output form (``normsurgeon.io.forms``, entry point ``placement``): custom placed
    folders; stock-loadable ones and stock loads are left to the generic loader."""
    if req.stock or req.section.get("stock_loadable", False):
        return None
    return load_placed(req.path)
