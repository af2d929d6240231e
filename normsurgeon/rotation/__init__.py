"""Rotating the residual stream by an orthogonal Q, exactly (computational invariance), for quantization.

- ``hadamard``: Hadamard matrices (Sylvester, Paley I/II, Kronecker products).
- ``orthogonal``: random / randomised-Hadamard Q, and their mean-preserving (``Q 1 = 1``) forms.
- ``tensors``: pure per-tensor ops ``f(w, b, layout, Q) -> (w, b)`` for writers and readers.
- ``plan``: what to rotate, from the conversion plan and the traced dataflow, or why not.
- ``apply``: the in-place rotation of a converted float64 model.
- ``exact_norms``: float64 verification past norms that compute in float32.
- ``run``: ``rotate(model, out, ...)``, the library function behind ``normsurgeon rotate``.

>>> from normsurgeon.rotation import rotate, rotate_in_memory, rotation_matrix
>>> callable(rotate) and callable(rotate_in_memory) and callable(rotation_matrix)
True
"""
from normsurgeon.rotation.orthogonal import (mean_preserving_hadamard, mean_preserving_random, random_hadamard,
                                             random_orthogonal, rotation_matrix)
from normsurgeon.rotation.run import Rotated, rotate, rotate_in_memory
from normsurgeon.rotation.tensors import rotate_reader, rotate_shift, rotate_writer

__all__ = ["Rotated", "mean_preserving_hadamard", "mean_preserving_random", "random_hadamard", "random_orthogonal",
           "rotate", "rotate_in_memory", "rotate_reader", "rotate_shift", "rotate_writer", "rotation_matrix"]
