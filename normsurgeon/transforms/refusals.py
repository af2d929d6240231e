"""Why a conversion cannot be exact: each reason tagged with its kind and first place, and the one-line
summary a refusal prints (the first cause, counts per kind, the first place; the full list is in
``normsurgeon inspect`` and ``--json``).

A 12-layer BERT has 25 Post-LN norms; listing each in the error made a 14,558-character line. The
summary says ``Post-LN: 25 norms normalize the residual stream itself, first `bert.embeddings.LayerNorm```.

>>> rs = [Refusal("`a.ln` is Post-LN", "post", "a.ln"), Refusal("`b.ln` is Post-LN", "post", "b.ln"),
...       Refusal("`x` writes 3 features", "width", "x")]
>>> summarize("Bert", "rmsnorm", rs)
'cannot convert Bert to Pre-RMSNorm exactly: Post-LN: 2 norms normalize the residual stream itself, first `a.ln`; also 1 residual writer of another width (`x`); `normsurgeon inspect` lists all 3 reasons'
"""
from __future__ import annotations

MAX_CHARS = 300


class Refusal(str):
    """One reason (the text, as ``str``) with its ``kind`` and the first place ``where`` it applies."""

    kind: str
    where: str

    def __new__(cls, text: str, kind: str, where: str = "") -> "Refusal":
        self = super().__new__(cls, text)
        self.kind, self.where = kind, where
        return self


# kind -> (how the first cause reads with its count, the short label for "also ...")
_PHRASES: dict[str, tuple[str, str]] = {
    "post": ("Post-LN: {n} norm{s} normalize{vs} the residual stream itself", "Post-LN norm"),
    "post-positions": ("positions are added after the norm: {n} norm{s} normalize{vs} the residual stream itself "
                       "(Post-LN-like)", "norm followed by positions"),
    "output": ("Peri-LN: {n} norm{s} normalize{vs} a sublayer output before it is added", "Peri-LN output norm"),
    "embedding": ("{n} embedding norm{s} read{vs} more than one table, so cannot be baked", "unbakeable embedding norm"),
    "norm": ("{n} norm{s} cannot have its affine folded", "unfoldable norm"),
    "calls": ("{n} norm{s} called more than once per forward pass", "norm called twice"),
    "stream": ("the raw residual stream is read without a norm at {n} place{s}", "raw-stream read"),
    "functional": ("functional norm calls outside any module", "functional norm"),
    "writer": ("{n} residual writer{s} cannot be rewritten in the checkpoint", "unrewritable writer"),
    "norm-writer": ("the output of {n} norm{s} is added to the residual stream", "norm{s} added to the stream"),
    "width": ("{n} residual writer{s} of another width", "residual writer{s} of another width"),
    "no-pre": ("no Pre-LN norm was found (no norm reads the residual stream before a block)", "no Pre-LN norm"),
    "mixed": ("{n} norm{s} of another family mixed with LayerNorms", "mixed norm family"),
    "eps": ("{n} norm{s} without a readable epsilon", "norm without epsilon"),
    "crms-output": ("{n} final norm output{s} would change width under Pre-CRMSNorm", "CRMS width change"),
}


_UNCOUNTED = {"no-pre", "functional"}


def _phrase(kind: str, items: list[Refusal], lead: bool) -> str:
    n = len(items)
    first = next((r.where for r in items if r.where), "")
    template, label = _PHRASES.get(kind, (None, kind))
    if lead:
        if template is None:  # a reason with its own full wording (already RMSNorm, no stream found, ...)
            text = str(items[0])
            return text if n == 1 else f"{text} (and {n - 1} more like it)"
        text = template.format(n=n, s="" if n == 1 else "s", vs="s" if n == 1 else "")
        return text + (f", first `{first}`" if first else "")
    if kind in _UNCOUNTED:
        return label
    label = label.format(s="" if n == 1 else "s") if "{s}" in label else label + ("" if n == 1 else "s")
    return f"{n} {label}" + (f" (`{first}`)" if first else "")


def summarize(model_class: str, target: str, reasons: list[Refusal | str]) -> str:
    """One line of at most about ``MAX_CHARS`` characters for a refused conversion."""
    by_kind: dict[str, list[Refusal]] = {}
    for r in reasons:
        r = r if isinstance(r, Refusal) else Refusal(r, "other")
        by_kind.setdefault(r.kind, []).append(r)
    kinds = list(by_kind)
    head = f"cannot convert {model_class} to Pre-{target.upper().replace('NORM', 'Norm')} exactly: "
    line = head + _phrase(kinds[0], by_kind[kinds[0]], lead=True)
    if len(line) > MAX_CHARS:
        line = line[: MAX_CHARS - 1] + "…"
    tail = f"; `normsurgeon inspect` lists all {len(reasons)} reasons" if len(reasons) > 1 else ""
    others = [_phrase(k, by_kind[k], lead=False) for k in kinds[1:]]
    if others:
        also = "; also " + ", ".join(others)
        while others and len(line + also + tail) > MAX_CHARS:
            others.pop()
            also = "; also " + ", ".join(others) + ", ..." if others else ""
        line += also
    return line + tail if len(line + tail) <= MAX_CHARS + 80 else line
