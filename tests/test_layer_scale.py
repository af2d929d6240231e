"""Layer scale (gamma * W(h) before the residual add: BEiT, DINOv2, Data2Vec-Vision) is folded into its
writer, so these models convert exactly; randomised norms, biases and gammas (not the 0.1 / 1e-5 inits)."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

from model_zoo import randomise
from normsurgeon.graph.normmap import build_norm_map
from normsurgeon.transforms.apply import apply_rms_plan
from normsurgeon.transforms.plan import plan_rms_conversion

VIT = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=64, num_labels=3)
MODELS = {
    "dinov2": lambda: T.Dinov2ForImageClassification(T.Dinov2Config(**VIT)),
    "beit": lambda: T.BeitForImageClassification(T.BeitConfig(**VIT, layer_scale_init_value=0.1)),
    "data2vec-vision": lambda: T.Data2VecVisionForImageClassification(
        T.Data2VecVisionConfig(**VIT, layer_scale_init_value=0.1, use_mean_pooling=True)),
}


def _random_gammas(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("target", ["rmsnorm", "crmsnorm"])
def test_layer_scaled_vision_transformers_convert_exactly_in_float64(name, target):
    model = _random_gammas(randomise(MODELS[name]())).eval().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = model(pixel_values=x).logits.log_softmax(-1)
    nm = build_norm_map(model)
    scaled = [w for w in nm.writers if w.scale]
    assert len(scaled) == 4, [(w.name, w.scale) for w in nm.writers]  # attention and MLP writers of 2 blocks
    if target == "crmsnorm" and name == "dinov2":  # its final norm is read through a concat of cls + mean
        pytest.skip("DINOv2's final norm output is concatenated along features: no Pre-CRMSNorm")
    plan = plan_rms_conversion(model, nm, target)
    work = copy.deepcopy(model)
    apply_rms_plan(work, plan)
    assert all(bool((work.get_parameter(s) == 1).all()) for s in plan.layer_scales.values())
    got = work(pixel_values=x).logits.log_softmax(-1)
    assert (got - ref).abs().max().item() < 1e-10  # float64 tolerance


def test_a_shared_gamma_is_not_folded():
    """A gain used by two writers cannot be folded into one of them: the stream is then not decomposable
    through it, and the model is refused rather than converted wrongly."""
    from normsurgeon.errors import UnsupportedModel

    class Shared(torch.nn.Module):
        def __init__(self, d=8):
            super().__init__()
            self.emb, self.n1, self.n2 = torch.nn.Embedding(10, d), torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            self.a, self.b, self.nf, self.head = (torch.nn.Linear(d, d), torch.nn.Linear(d, d),
                                                   torch.nn.LayerNorm(d), torch.nn.Linear(d, 4))
            self.gamma = torch.nn.Parameter(torch.rand(d) + 0.5)

        def forward(self, ids):
            x = self.emb(ids)
            x = x + self.gamma * self.a(self.n1(x))
            x = x + self.gamma * self.b(self.n2(x))
            return self.head(self.nf(x))

        def example_inputs(self):
            return {"ids": torch.randint(0, 10, (1, 4))}

    model = Shared().eval()
    nm = build_norm_map(model)
    assert not any(w.scale for w in nm.writers)
    with pytest.raises(UnsupportedModel):
        plan_rms_conversion(model, nm, "rmsnorm")


@pytest.mark.parametrize("name", ["dinov2", "beit"])
def test_layer_scaled_convert_cli_writes_a_stock_loadable_exact_checkpoint(name, tmp_path, capfd):
    from faults import cli

    _random_gammas(randomise(MODELS[name]())).save_pretrained(tmp_path / "src")
    code, out, err = cli(capfd, "convert", tmp_path / "src", "-o", tmp_path / "out", "--json")
    assert code == 0, err
    import json

    report = json.loads(out)
    assert report["status"] == "pass" and report["stock_loadable"]
    assert report["metrics"]["max_abs_logprob"]["value"] < 1e-4  # float32 tolerance
    assert report["stock_load"]["status"] == "pass"
    code, out, err = cli(capfd, "convert", tmp_path / "src", "-o", tmp_path / "streamed", "--stream", "--json")
    assert code == 0, err  # one engine (issue 14): streaming folds layer scales too
    assert json.loads(out)["status"] == "pass"
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert shards and all((tmp_path / "out" / n).read_bytes() == (tmp_path / "streamed" / n).read_bytes()
                          for n in shards), "the streamed shards differ from the in-memory ones"
