"""Labelled images for fine-tuning an image classifier, and the batches of each optimizer step.

``--data`` for a vision model accepts
- a factory ``package.module:function`` called as ``function("train")`` and ``function("heldout")``,
  each returning ``(pixel_values [N, C, H, W] float, labels [N] int)`` (e.g.
  ``examples.tiny_vit.vit:digits``);
- a ``.npz`` file with arrays ``x_train, y_train, x_test, y_test`` (or ``x, y``: then a seeded 20 %
  of the images is held out).

Images must already be preprocessed to the model's input (channels, size, scaling).

>>> data = ImageData(torch.zeros(10, 1, 2, 2), torch.arange(10), torch.zeros(3, 1, 2, 2), torch.arange(3), {})
>>> step_indices(data, step=0, batch_size=4, seed=0).tolist(), step_indices(data, step=2, batch_size=4, seed=0).numel()
([4, 1, 7, 5], 4)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from normsurgeon.errors import InputError
from normsurgeon.io.factory import resolve_attribute

HELDOUT_FRACTION = 0.2


@dataclasses.dataclass
class ImageData:
    x_train: torch.Tensor  # [N, C, H, W]
    y_train: torch.Tensor  # [N] int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    description: dict[str, Any]


def _pair(obj: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise InputError(f"{where} must return (pixel_values, labels), not {type(obj).__name__}")
    x, y = (torch.as_tensor(v) for v in obj)
    return x, y


def _factory(spec: str, split: str) -> Any:
    return resolve_attribute(spec, "data factory")(split)


def load_image_data(spec: str, seed: int = 0) -> ImageData:
    path = Path(spec)
    desc: dict[str, Any] = {"source": spec}
    if not path.exists() and ":" in spec and not spec.startswith(("/", ".")):
        x_tr, y_tr = _pair(_factory(spec, "train"), f"{spec}('train')")
        x_te, y_te = _pair(_factory(spec, "heldout"), f"{spec}('heldout')")
        desc["split"] = "the factory's own train / heldout splits"
    elif not path.exists():
        raise InputError(f"no such data file: {spec}")
    elif path.suffix == ".npz":
        import numpy as np

        try:
            arrays = dict(np.load(path))
        except Exception as e:  # noqa: BLE001 - corrupt or foreign file
            raise InputError(f"cannot read {path}: {e}") from None
        if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
            x_tr, y_tr, x_te, y_te = (torch.as_tensor(arrays[k]) for k in ("x_train", "y_train", "x_test", "y_test"))
            desc["split"] = "the file's x_train / x_test"
        elif {"x", "y"} <= arrays.keys():
            x, y = torch.as_tensor(arrays["x"]), torch.as_tensor(arrays["y"])
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
            cut = int(round(len(y) * (1 - HELDOUT_FRACTION)))
            x_tr, y_tr, x_te, y_te = x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]
            desc["split"] = f"seeded {HELDOUT_FRACTION:.0%} held out (seed {seed})"
        else:
            raise InputError(f"{path} needs arrays x_train, y_train, x_test, y_test (or x, y); it has {sorted(arrays)}")
    else:
        raise InputError(f"image data must be a .npz file or a package.module:function factory, not {spec}")
    for name, x, y in (("train", x_tr, y_tr), ("held-out", x_te, y_te)):
        if x.dim() != 4 or y.dim() != 1 or len(x) != len(y) or len(y) == 0:
            raise InputError(f"the {name} split must be images [N, C, H, W] with labels [N]; got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
    desc.update(train_images=len(y_tr), heldout_images=len(y_te), image_shape=list(x_tr.shape[1:]))
    return ImageData(x_tr.float(), y_tr.long(), x_te.float(), y_te.long(), desc)


def check_against_model(data: ImageData, model: torch.nn.Module) -> None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return
    size = getattr(cfg, "image_size", None)
    size = size if isinstance(size, int) or size is None else size[0]
    c = getattr(cfg, "num_channels", None)
    shape = tuple(data.x_train.shape[1:])
    if (c is not None and shape[0] != c) or (size is not None and shape[1:] != (size, size)):
        raise InputError(f"the images are {list(shape)} but the model expects [{c}, {size}, {size}]")
    n = getattr(cfg, "num_labels", None)
    top = int(max(data.y_train.max(), data.y_test.max()))
    if n is not None and (top >= n or int(min(data.y_train.min(), data.y_test.min())) < 0):
        raise InputError(f"labels must be in [0, {n}) for this model; the data has label {top}")


def step_indices(data: ImageData, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """Training images of one optimizer step, a pure function of (seed, step): epoch-wise permutations."""
    n = data.y_train.numel()
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, pos = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(batch_size - len(out), n - pos)
        out.extend(perm[pos:pos + take].tolist())
    return torch.tensor(out, dtype=torch.long)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> dict:
    """Accuracy and mean cross-entropy over (x, y), eval mode."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    correct, loss = 0, 0.0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        logits = classifier_logits(model, xb.to(device, dtype)).double()
        correct += int((logits.argmax(-1).cpu() == yb).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, yb.to(device), reduction="sum"))
    model.train(was)
    return {"accuracy": correct / len(y), "loss": loss / len(y), "images": len(y)}


def classifier_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x) if getattr(model, "config", None) is not None else model(x)
    return out.logits if hasattr(out, "logits") else out
