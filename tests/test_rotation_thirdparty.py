"""Issue 13: a third-party quantizer runs on a rotated output. llm-compressor (0.14) runs on CPU, data-free
(``QuantizationModifier``, int4 per channel); it is not a dependency of normsurgeon, so this test runs only
where it is installed (docs/rotation.md says how it was checked)."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from model_zoo import build_zoo

llmcompressor = pytest.importorskip("llmcompressor")


def test_llm_compressor_quantizes_a_rotated_output(tmp_path):
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from normsurgeon.rotation import rotate

    build_zoo("llama").save_pretrained(tmp_path / "src")
    assert rotate(str(tmp_path / "src"), tmp_path / "rot", method="hadamard")["status"] == "pass"
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "rot").eval()
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits.log_softmax(-1)
    scheme = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                               "strategy": "channel"}}}
    oneshot(model=model, recipe=QuantizationModifier(ignore=["lm_head"], config_groups=scheme))
    assert getattr(model.model.layers[0].self_attn.q_proj, "quantization_scheme", None) is not None
    with torch.no_grad():
        out = model(ids).logits.log_softmax(-1)
    assert 0 < (out - ref).abs().max().item() < 0.5
