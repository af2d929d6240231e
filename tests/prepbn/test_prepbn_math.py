"""RepBN / PRepBN forward semantics, the blend schedule, recalibration, and the float64 fold."""
from __future__ import annotations

import copy

import pytest
import torch

from model_zoo import build, model_inputs
from normsurgeon.errors import UsageError
from normsurgeon.prepbn.convert import find_sites, install_prepbn
from normsurgeon.prepbn.fold import fold_sites, recalibrate
from normsurgeon.prepbn.repbn import PRepBN, RepBN, prepbn_modules, set_blend
from normsurgeon.prepbn.schedule import BlendSchedule

D64 = torch.float64


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Random BN statistics, affine and eta, so that a fold that ignores any term is caught."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in prepbn_modules(model).values():
            bn, d = m.repbn.bn, m.repbn.size
            bn.running_mean.copy_(torch.randn(d, generator=gen))
            bn.running_var.copy_(0.2 + 3 * torch.rand(d, generator=gen))
            bn.weight.copy_(1 + 0.5 * torch.randn(d, generator=gen))
            bn.bias.copy_(0.5 * torch.randn(d, generator=gen))
            m.repbn.eta.fill_(float(0.5 * torch.randn((), generator=gen)))


def test_repbn_eval_is_the_documented_affine():
    torch.manual_seed(0)
    rep = RepBN(6).double()
    _ = rep.train()(torch.randn(4, 7, 6, dtype=D64) * 3 + 1)
    rep.eta.data.fill_(0.7)
    rep.eval()
    x = torch.randn(3, 5, 6, dtype=D64)
    bn = rep.bn
    inv = 1 / torch.sqrt(bn.running_var + bn.eps)
    s = bn.weight * inv + 0.7
    t = bn.bias - bn.weight * bn.running_mean * inv
    assert torch.allclose(rep(x), x * s + t, atol=1e-14)
    # train mode: statistics over batch and tokens of [B, T, d]
    rep.train()
    y = rep.bn(x.reshape(-1, 6))
    ref = (x.reshape(-1, 6) - x.reshape(-1, 6).mean(0)) / torch.sqrt(x.reshape(-1, 6).var(0, unbiased=False) + bn.eps)
    assert torch.allclose(y, ref * bn.weight + bn.bias, atol=1e-12)


def test_prepbn_blend_forward():
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(8).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    m = PRepBN(ln, 8, eta=0.3).double().train()
    assert torch.equal(m.repbn.bn.weight, ln.weight) and torch.equal(m.repbn.bn.bias, ln.bias)
    x = torch.randn(4, 5, 8, dtype=D64)
    m.set_blend(1.0)
    assert torch.equal(m(x), ln(x)) and int(m.repbn.bn.num_batches_tracked) == 0  # warm-up: BN untouched
    m.set_blend(0.0)
    rep_train = copy.deepcopy(m.repbn)(x)
    assert torch.allclose(m(x), rep_train)
    m.set_blend(0.25)
    assert torch.allclose(m(x), 0.25 * ln(x) + 0.75 * copy.deepcopy(m.repbn)(x))
    m.eval().set_blend(1.0)  # eval is RepBN whatever the blend weight
    assert torch.equal(m(x), m.repbn(x))


def test_schedule_boundaries():
    s = BlendSchedule(warmup=100, steps=400)
    assert s.weight(0) == 1.0 and s.weight(99) == 1.0  # warm-up: pure LayerNorm
    assert s.weight(100) == 1.0 and s.weight(101) == pytest.approx(399 / 400)  # decay starts at r0
    assert s.weight(300) == pytest.approx(0.5)  # midpoint
    assert s.weight(499) == pytest.approx(1 / 400) and s.weight(500) == 0.0 and s.weight(10**6) == 0.0
    assert s.end == 500 and s.phase(99) == "LN warm-up" and s.phase(300) == "blend" and s.phase(500) == "RepBN"
    assert BlendSchedule(10, 20, r0=0.5).weight(20) == pytest.approx(0.25)
    d = BlendSchedule.for_training(300)
    assert (d.warmup, d.steps, d.end) == (30, 180, 210)
    with pytest.raises(UsageError, match="must be gone before the fold"):
        BlendSchedule.for_training(100, warmup=50, steps=60)


def test_recalibration_gives_population_statistics():
    torch.manual_seed(0)
    m = torch.nn.Sequential(PRepBN(torch.nn.LayerNorm(4), 4), torch.nn.Linear(4, 2)).double().eval()
    batches = [torch.randn(3, 5, 4, dtype=D64) * 2 + torch.arange(4.0, dtype=D64) for _ in range(6)]
    n = recalibrate(m, batches, lambda mod, x: mod(x))
    bn = m[0].repbn.bn
    allx = torch.cat([b.reshape(-1, 4) for b in batches])
    assert n == 6 and not bn.training and bn.momentum == 0.1
    assert torch.allclose(bn.running_mean, allx.mean(0), atol=1e-12)
    per_batch_var = torch.stack([b.reshape(-1, 4).var(0, unbiased=True) for b in batches]).mean(0)
    assert torch.allclose(bn.running_var, per_batch_var, atol=1e-12)
    assert float(m[0].blend) == 0.0


@pytest.mark.parametrize("family", ["vit", "gpt2", "llama"])
def test_fold_equals_unfolded_repbn(family):
    src = build(family)
    sites = find_sites(src)
    model = copy.deepcopy(src)
    install_prepbn(model, sites)
    _randomise_bn(model)
    model.eval()
    inputs = model_inputs(model)

    def logits(m):
        with torch.no_grad():
            return m(**inputs).logits.double()

    ref64 = copy.deepcopy(model).double()
    folded64 = copy.deepcopy(ref64)
    info = fold_sites(folded64, sites)
    a, b = logits(ref64), logits(folded64)
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-10
    folded32 = copy.deepcopy(folded64).float()
    a32, b32 = logits(model), logits(folded32)
    assert float((a32 - b32).abs().max() / a32.abs().max()) <= 1e-4
    kinds = {type(m).__name__ for m in folded32.modules()}
    assert not kinds & {"LayerNorm", "PRepBN", "RepBN", "BatchNorm1d", "LlamaRMSNorm"}, kinds
    assert set(info.identity) == {s.name for s in sites}
    if family == "gpt2":
        assert info.untied == ["lm_head"] and info.created_bias == ["lm_head"]
        assert folded32.lm_head.weight is not folded32.transformer.wte.weight
        assert torch.equal(folded32.transformer.wte.weight, model.transformer.wte.weight)  # table untouched
        assert [r for r, _ in sites[0].readers] == ["transformer.h.0.attn.c_attn"]  # Conv1D layout
    if family == "vit":
        assert [r for r, _ in sites[0].readers][-1].endswith("v_proj") and sites[-1].readers == [("classifier", "linear")]


def test_blend_setter_and_sites_refuse_post_ln():
    from normsurgeon.errors import UnsupportedModel

    with pytest.raises(UnsupportedModel, match="not a Pre-LN transformer"):
        find_sites(build("bert"))
    m = build("gpt2")
    install_prepbn(m, find_sites(m))
    set_blend(m, 0.4)
    assert {round(float(x.blend), 6) for x in prepbn_modules(m).values()} == {0.4}
