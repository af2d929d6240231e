"""check_fits: the shared data checks of remove-ln and prepbn (window length, token ids in range)."""
from __future__ import annotations

import pytest
import torch

from normsurgeon.errors import InputError, UsageError
from normsurgeon.train.data import TokenData, check_fits, tokenizer_for


def _data(top: int, n: int = 100) -> TokenData:
    return TokenData(torch.arange(n) % (top + 1), torch.full((n,), top), {})


def test_ids_inside_the_vocabulary_pass():
    check_fits(_data(95), block_size=16, vocab_size=96, tok=tokenizer_for(None, 96, "bytes"))
    check_fits(_data(10_000), block_size=16, vocab_size=None, tok=tokenizer_for(None, 96, "bytes"))


def test_an_id_outside_the_vocabulary_is_an_input_error():
    with pytest.raises(InputError, match="token id 96, outside the model's vocabulary of 96"):
        check_fits(_data(96), block_size=16, vocab_size=96, tok=tokenizer_for(None, 96, "bytes"))


def test_a_split_shorter_than_a_window_is_a_usage_error():
    with pytest.raises(UsageError, match="fewer than one window"):
        check_fits(_data(5, n=10), block_size=16, vocab_size=96, tok=tokenizer_for(None, 96, "bytes"))
