"""remove-ln: the fake norm, the q/k vs v split, and both export forms, on random tiny models of four
families (randomised norm gains/shifts and biases), compared numerically in float64."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

from model_zoo import build, randomise
from normsurgeon.lnfree.export import StockFormUnavailable, build_stock_model, fold_native
from normsurgeon.lnfree.fake_norm import FixedScaleNorm
from normsurgeon.lnfree.recipe import load_lnfree_recipe
from normsurgeon.lnfree.schedule import events
from normsurgeon.lnfree.sites import install


def _llama():
    torch.manual_seed(0)
    return randomise(T.LlamaForCausalLM(T.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=4, intermediate_size=64)))


def _model(family: str) -> torch.nn.Module:
    return (_llama() if family == "llama" else build(family)).double().eval()


IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
FAMILIES = ["gpt2", "gpt_neox", "opt", "llama"]


def _logits(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits


def _fake_all(sites, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for s in sites.sites:
        mod = sites.module(s.name)
        mod.sigma_ema.fill_(0.5 + torch.rand((), generator=gen).item())
        mod.set_fake(True, True)


@pytest.mark.parametrize("family", ["layernorm", "rmsnorm", "rmsnorm_offset"])
def test_fake_norm_real_and_fixed_paths(family):
    d, eps = 8, 1e-5
    w = torch.nn.Parameter(torch.randn(d, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(d, dtype=torch.float64)) if family == "layernorm" else None
    f = FixedScaleNorm(family, d, eps, w, b)
    x = torch.randn(3, 5, d, dtype=torch.float64) * 2 + 0.3
    g = 1 + w if family == "rmsnorm_offset" else w
    c = x - x.mean(-1, keepdim=True) if family == "layernorm" else x
    real = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + eps) * g + (b if b is not None else 0)
    assert (f(x) - real).abs().max() < 1e-12
    f.sigma_ema.fill_(1.7)
    f.set_fake(True, True)
    assert float(f.sigma) == pytest.approx(1.7)
    assert (f(x) - (c / 1.7 * g + (b if b is not None else 0))).abs().max() < 1e-12


def test_ema_tracks_then_freezes():
    f = FixedScaleNorm("layernorm", 4, 0.0, None, None, momentum=0.5).train()
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]])  # per-token scale 1
    f.sigma_ema.fill_(3.0)
    f(x)
    assert float(f.sigma_ema) == pytest.approx(2.0)
    f.set_fake(True, False)  # the first removal freezes sigma
    f(x * 10)
    assert float(f.sigma) == pytest.approx(2.0) and float(f.sigma_ema) == pytest.approx(2.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_install_native_and_stock_forms(family):
    model = _model(family)
    ref = _logits(model)
    sites = install(model)
    assert {s.role for s in sites.sites} == {"mlp", "attn", "final"}
    tol_live = 1e-6 if family == "llama" else 1e-10  # LlamaRMSNorm computes in float32 internally
    assert (_logits(model) - ref).abs().max() < tol_live
    _fake_all(sites)
    fake = _logits(model)
    assert (fake - ref).abs().max() > 1e-3  # removal changes the function
    sites.remove_hooks()
    native = copy.deepcopy(model)
    fold_native(native, sites.sites)
    assert not any(isinstance(m, FixedScaleNorm) for m in native.modules())
    lp = lambda t: t.log_softmax(-1)  # noqa: E731
    assert (lp(_logits(native)) - lp(fake)).abs().max() < 1e-10
    if family == "opt":
        with pytest.raises(StockFormUnavailable, match="epsilon"):
            build_stock_model(model, sites.sites)
        return
    stock = build_stock_model(model, sites.sites)
    assert all(not isinstance(m, FixedScaleNorm) for m in stock.modules())
    assert (lp(_logits(stock)) - lp(fake)).abs().max() < (1e-6 if family == "llama" else 1e-9)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_qk_and_value_paths_are_routed(family):
    """With q/k fake and v real, the attention projections' value outputs equal the all-real model's and
    their q/k outputs the all-fake model's."""
    model = _model(family)
    sites = install(model)
    attn = sites.by_role("attn")[0]
    assert attn.split
    readers = [r for r, _ in attn.readers]
    captured: dict[str, torch.Tensor] = {}
    for r in readers:
        model.get_submodule(r).register_forward_hook(lambda m, a, o, r=r: captured.__setitem__(r, o.detach()))

    def run(main, v):
        for s in sites.sites:
            mod = sites.module(s.name)
            mod.sigma_ema.fill_(1.3)
            mod.flags.zero_()
            mod.set_fake(main, v) if s.name == attn.name else mod.set_fake(False, False)
        _logits(model)
        return {r: captured[r].clone() for r in readers}

    real, fake, mixed = run(False, False), run(True, True), run(True, False)
    for r in readers:
        mod = model.get_submodule(r)
        mask = getattr(mod, "_lnfree_vmask", None)
        if mask is None:  # separate projections: v_proj reads the real path, the others the fake one
            want = real[r] if r.endswith("v_proj") else fake[r]
            assert (mixed[r] - want).abs().max() < 1e-12, r
        else:
            assert mask.sum() == mask.numel() // 3
            assert (mixed[r][..., mask] - real[r][..., mask]).abs().max() < 1e-12
            assert (mixed[r][..., ~mask] - fake[r][..., ~mask]).abs().max() < 1e-12


def test_dyt_native_form_matches():
    model = _model("gpt2")
    ref_sites = install(model, mode="dyt", dyt_alpha0=0.7)
    for s in ref_sites.sites:
        ref_sites.module(s.name).set_fake(True, True)
    ln_f = ref_sites.module("transformer.ln_f")
    x = torch.randn(2, 32, dtype=torch.float64)
    assert (ln_f(x) - (torch.tanh(0.7 * x) * ln_f.weight + ln_f.bias)).abs().max() < 1e-12
    fake = _logits(model)
    ref_sites.remove_hooks()
    native = copy.deepcopy(model)
    info = fold_native(native, ref_sites.sites)
    assert len(info.dyt) == len(ref_sites.sites)
    assert (_logits(native) - fake).abs().max() < 1e-12


def test_published_schedule_events():
    rec = load_lnfree_recipe("remove-ln-gpt2-small")
    from normsurgeon.lnfree.sites import Site

    sites = [Site(f"h.{i}.ln_2", "mlp", i, "layernorm", []) for i in range(12)] + \
            [Site(f"h.{i}.ln_1", "attn", i, "layernorm", [], split=True) for i in range(12)] + \
            [Site("ln_f", "final", 12, "layernorm", [])]
    ev = events(rec.schedule, sites)
    by = lambda stage: [e.step for e in ev if e.stage == stage]  # noqa: E731
    assert by("mlp") == list(range(20, 44, 2))
    assert by("attn_qk") == list(range(44, 68, 2))
    assert by("attn_v") == list(range(68, 104, 3))
    assert by("final") == [104]
