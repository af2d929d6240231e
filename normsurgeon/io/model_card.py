"""The output's model card (``README.md``), written with ``huggingface_hub``'s ``ModelCard``.

Every recipe's output gets one: YAML metadata (``base_model``, ``library_name``, ``tags``, the source's
licence and languages), what was done, the equivalence result, how to load it, and the source's own
card below it under a heading (its YAML front matter stripped, its headings moved two levels down).

>>> import tempfile, pathlib, json
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
>>> p = write_model_card(d, "gpt2", None, "fold-bn", {"status": "pass"}, True, ["folded 3 BatchNorms"])
>>> card = p.read_text()
>>> "library_name: transformers" in card and "AutoModelForCausalLM.from_pretrained" in card
True
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from normsurgeon.markdown import md_code, md_table

CARD = "README.md"
_FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.S)
_CARRIED = ("license", "license_name", "license_link", "language")  # the source's terms apply to the result
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_STAGING = re.compile(r"^\.(.+)\.partial(?:-\d+)?$")
_AUTO = (("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation"),
         ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image-classification"),
         ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "text2text-generation"),
         ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "fill-mask"),
         ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text-classification"),
         ("AutoModelForAudioClassification", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "audio-classification"),
         ("AutoModelForCTC", "MODEL_FOR_CTC_MAPPING_NAMES", "automatic-speech-recognition"),
         ("AutoModel", "MODEL_MAPPING_NAMES", None))
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def write_model_card(dest: str | Path, source_ref: str, source_folder: str | Path | None, recipe: str,
                     report: dict, stock_loadable: bool, done: Sequence[str], *,
                     output_path: str | Path | None = None, equivalence: Sequence[str] | None = None,
                     loading_notes: Sequence[str] = ()) -> Path:
    """Write ``dest/README.md`` and return its path.

    ``source_ref``: the model as the user named it (hub id, path or factory; a factory is no
    ``base_model``); ``source_folder``: where its files are (its ``README.md`` is kept below), or None;
    ``recipe``: the command or recipe name (a tag); ``report``: the recipe's report dict (its status and
    metrics become the equivalence section, unless ``equivalence`` gives the lines); ``stock_loadable``:
    stock ``from_pretrained`` loads ``dest`` (``library_name: transformers``, else ``normsurgeon``);
    ``done``: what was done, one Markdown line each. ``output_path``: the folder's name in the loading
    snippet (default: ``dest``'s name, its staging prefix removed); ``loading_notes``: extra lines for
    the loading section (other forms in subfolders...).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from normsurgeon.version import __version__

    dest = Path(dest)
    shown = str(output_path) if output_path is not None else _final_name(dest)
    config = _read_json(dest / "config.json")
    arch = (config.get("architectures") or [None])[0]
    stock = bool(stock_loadable and arch)
    auto, pipeline_tag = _auto_class(arch) if stock else (None, None)
    source_meta, source_text = _source_card(source_folder)
    meta: dict[str, Any] = {k: source_meta[k] for k in _CARRIED if source_meta.get(k)}
    base_model = None if _is_factory(source_ref) else str(source_ref)
    tags = ["normsurgeon"] + ([recipe] if recipe and recipe != "normsurgeon" else [])
    data = ModelCardData(base_model=base_model, library_name="transformers" if stock else "normsurgeon", tags=tags,
                         pipeline_tag=source_meta.get("pipeline_tag") or pipeline_tag, **meta)

    title = Path(shown).name or shown
    src = f"[`{source_ref}`](https://huggingface.co/{source_ref})" if _looks_like_hub_id(source_ref) else \
        md_code(source_ref)
    lines = [f"# {title}", "",
             f"{src} after `normsurgeon {recipe}` (normsurgeon {__version__}): surgery on the normalization "
             "layers, with a numerical check that the result computes what it should.", "",
             "## What was done", ""]
    lines += [f"- {d}" for d in done] or ["- (nothing recorded)"]
    lines += ["", "## Equivalence", ""]
    lines += list(equivalence) if equivalence is not None else equivalence_lines(report)
    lines += ["", "## How to load", ""]
    lines += _loading(shown, stock, auto, arch, config, any((dest / f).is_file() for f in _TOKENIZER_FILES))
    if loading_notes:
        lines += [""] + [f"- {n}" for n in loading_notes]
    if source_text.strip():
        lines += ["", "## Source model card", "", f"The model card of {md_code(source_ref)}, as it came:", "",
                  _demote(source_text.strip(), 2)]
    body = "\n".join(lines).rstrip() + "\n"
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}", ignore_metadata_errors=True)
    path = dest / CARD
    card.save(path)
    return path


# -- equivalence -------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4) else f"{v:.6g}"
    return str(v)


_LABELS = {"max_abs_logprob": "max |Δ log-prob|", "mean_kl": "mean KL(source‖result)",
           "top1_agreement": "top-1 agreement (decided positions)", "top1_agreement_all": "top-1 agreement (all)",
           "max_abs_logit": "max |Δ logit| (information)"}


def equivalence_lines(report: dict) -> list[str]:
    """The equivalence section's Markdown lines, from any normsurgeon report: the equivalence schema
    (``metrics``: convert, verify, fold-bn), prepbn's ``fold_check``, remove-ln's ``losses`` and ``export``
    checks, place's ``preservation`` and ``evaluation``.

    >>> equivalence_lines({"status": "pass", "metrics": {"max_abs_logprob": {"value": 2e-7, "threshold": 1e-4,
    ...                                                                        "ok": True}}})[0]
    'Status: **PASS**; max |Δ log-prob| 2.000e-07 (threshold 1.000e-04).'
    """
    status = str(report.get("status", "?")).upper()
    out: list[str] = []
    metrics = report.get("metrics")
    if isinstance(metrics, dict) and metrics:
        lead = metrics.get("max_abs_logprob") or next(iter(metrics.values()))
        name = "max |Δ log-prob|" if "max_abs_logprob" in metrics else next(iter(metrics))
        out.append(f"Status: **{status}**; {name} {_fmt(lead.get('value'))} (threshold {_fmt(lead.get('threshold'))}).")
        rows = [[_LABELS.get(k, k), _fmt(m.get("value")), _fmt(m.get("threshold")),
                 {True: "✓", False: "✗"}.get(m.get("ok"), "info")] for k, m in metrics.items()]
        out += ["", md_table(["metric", "value", "threshold", "ok"], rows)]
        stock = report.get("stock_load")
        if isinstance(stock, dict) and stock.get("metrics"):
            out += ["", f"Loaded with stock `{stock.get('loaded_as')}`: {str(stock.get('status')).upper()}, max "
                        f"|Δ log-prob| {_fmt(stock['metrics'].get('max_abs_logprob', {}).get('value'))}."]
    elif isinstance(report.get("fold_check"), dict):  # prepbn
        checks = report["fold_check"]
        out.append(f"Status: **{status}**. The fold of every RepBN into its readers, folded vs unfolded model "
                   "(max |Δ logit| ÷ max |logit|):")
        out += ["", md_table(["check", "relative max |Δ logit|", "threshold", "max |Δ log-prob|", "ok"],
                             [[k, _fmt(c.get("rel_to_scale")), _fmt(c.get("threshold")), _fmt(c.get("max_abs_logprob")),
                               "✓" if c.get("ok") else "✗"] for k, c in checks.items()])]
        metric, res = report.get("metric", "loss"), report.get("results", {})
        if res:
            out += ["", f"The LayerNorm → RepBN swap is trained, not exact; {metric}:", "",
                    md_table(["model", metric], [[k, _fmt(v.get(metric))] for k, v in res.items()])]
    elif isinstance(report.get("losses"), dict) and isinstance(report.get("export"), dict):  # remove-ln
        L, ex = report["losses"], report["export"]
        out.append(f"Status: **{status}**. Removing the norms is trained, not exact: held-out loss "
                   f"({L.get('unit', 'nats/token')}):")
        rows = [[k.replace("_", " "), _fmt(L.get(k))] for k in ("before", "removed_no_finetune", "after", "control",
                                                               "gap_vs_control") if L.get(k) is not None]
        out += ["", md_table(["model", "loss"], rows), "", "The written forms against the trained model:", ""]
        nat, st = ex.get("native", {}), ex.get("stock", {})
        if "float64_vs_fake" in nat:
            out.append(f"- native form: max |Δ log-prob| {_fmt(nat['float64_vs_fake'])} in float64")
        cmp = st.get("written_vs_native") or st.get("written_vs_fake")
        if isinstance(cmp, dict):
            out.append(f"- stock form: max |Δ log-prob| {_fmt(cmp.get('max_abs_logprob'))} ({cmp.get('dtype')}, "
                       f"threshold {_fmt(cmp.get('threshold'))})")
    elif isinstance(report.get("preservation"), dict):  # place
        pres, ev = report["preservation"], report.get("evaluation")
        source = str((report.get("data") or {}).get("source", ""))
        loss = "loss on the built-in sample text" if source.startswith(("built-in", "seeded")) else "held-out loss"
        out += [f"Preserves the function: **{pres.get('level')}**.", ""]
        out += [f"- {k}: {v}" for k, v in (pres.get("reasons") or {}).items()]
        if ev:
            out.append(f"- {loss} {_fmt(ev.get('loss_before'))} → {_fmt(ev.get('loss_after'))} (Δ "
                       f"{ev.get('delta_loss', 0):+.4g} nats/token); max |Δ log-prob| "
                       f"{_fmt(ev.get('max_abs_logprob_diff'))}; top-1 agreement {_fmt(ev.get('top1_agreement'))}")
    else:
        out.append(f"Status: **{status}**.")
    for w in report.get("warnings") or []:
        out.append(f"- warning: {w}")
    return out


# -- loading -----------------------------------------------------------------------------------------------
def _loading(shown: str, stock: bool, auto: str | None, arch: str | None, config: dict, tokenizer: bool) -> list[str]:
    path = json.dumps(shown)
    if stock:
        cls = auto or arch
        code = [f"from transformers import {cls}", "", f"model = {cls}.from_pretrained({path})"]
        if tokenizer:
            code = [f"from transformers import AutoTokenizer, {cls}", "", f"model = {cls}.from_pretrained({path})",
                    f"tokenizer = AutoTokenizer.from_pretrained({path})"]
        return ["Stock transformers loads it (no normsurgeon, no remote code):", "", "```python", *code, "```", "",
                "`normsurgeon.load` loads it too (after a norm conversion: with normsurgeon's own norm modules in "
                "place of the stock ones):", "",
                "```python", "import normsurgeon", "", f"model = normsurgeon.load({path}).model", "```"]
    if str(config.get("model_type", "")).startswith("normsurgeon_"):
        why = (f"`config.json` says `model_type: {config.get('model_type')}`, so stock transformers refuses the "
               "folder rather than load a different function")
    elif not config.get("architectures"):
        why = "a plain PyTorch module, no Hugging Face class: normsurgeon rebuilds it"
    else:
        why = "no stock class holds this structure"
    return [f"Load it with normsurgeon (pure PyTorch, no remote code; {why}):", "", "```python", "import normsurgeon", "",
            f"model = normsurgeon.load({path}).model", "```"]


def _auto_class(arch: str | None) -> tuple[str | None, str | None]:
    if not arch:
        return None, None
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return None, None
    for auto, mapping, tag in _AUTO:
        names = getattr(modeling_auto, mapping, {})
        for v in names.values():
            if arch == v or (isinstance(v, (tuple, list)) and arch in v):
                return auto, tag
    return None, None


# -- the source's card -------------------------------------------------------------------------------------
def split_front_matter(text: str) -> tuple[dict, str]:
    """(metadata, body) of a model card; metadata {} when there is no (readable) YAML front matter.

    >>> split_front_matter("---\\nlicense: mit\\n---\\n# T\\n")
    ({'license': 'mit'}, '# T\\n')
    """
    import yaml

    m = _FRONT_MATTER.match(text)
    if m is None:
        return {}, text
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        meta = {}
    return (meta if isinstance(meta, dict) else {}), text[m.end():]


def _source_card(folder: str | Path | None) -> tuple[dict, str]:
    if folder is None:
        return {}, ""
    p = Path(folder) / CARD
    try:
        text = p.read_text(encoding="utf-8", errors="replace") if p.is_file() else ""
    except OSError:
        return {}, ""
    return split_front_matter(text)


def _demote(text: str, levels: int) -> str:
    """Move every ATX heading outside fenced code ``levels`` down (at most ``######``).

    >>> _demote("# A\\n```\\n# code\\n```\\n## B", 2)
    '### A\\n```\\n# code\\n```\\n#### B'
    """
    out, fence = [], None
    for line in text.split("\n"):
        s = line.lstrip()
        m = re.match(r"(`{3,}|~{3,})", s)
        if m:
            if fence is None:
                fence = m.group(1)
            elif s.startswith(fence):
                fence = None
        elif fence is None and re.match(r"#{1,6}(\s|$)", s) and len(line) - len(s) < 4:
            hashes = len(s) - len(s.lstrip("#"))
            line = "#" * min(6, hashes + levels) + s[hashes:]
        out.append(line)
    return "\n".join(out)


def _final_name(dest: Path) -> str:
    m = _STAGING.match(dest.name)
    return m.group(1) if m else dest.name


def _is_factory(ref: str) -> bool:
    return ":" in str(ref) and not Path(str(ref)).exists() and not re.match(r"^[A-Za-z]:[\\/]", str(ref))


def _looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(str(ref))) and not Path(str(ref)).exists()


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}
