"""The norm map is derived from dataflow: roles, placements, custom norm classes, and fail-closed cases."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

from model_zoo import build, model_inputs, randomise
from normsurgeon.errors import UnsupportedModel
from normsurgeon.graph.norm_kinds import classify_norm
from normsurgeon.graph.normmap import build_norm_map
from normsurgeon.transforms.apply import apply_rms_plan
from normsurgeon.transforms.plan import plan_rms_conversion


@pytest.mark.parametrize("family,placement", [("gpt2", "pre-ln"), ("gptj", "parallel"), ("gpt_neox", "parallel"),
                                               ("phi", "parallel"), ("vit", "pre-ln"), ("opt_post_ln", "post-ln")])
def test_block_placement(family, placement):
    assert build_norm_map(build(family)).placement == placement


def test_qk_norms_are_inner_and_left_alone():
    cfg = T.PhiConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, qk_layernorm=True, bos_token_id=0, eos_token_id=0)
    model = randomise(T.PhiForCausalLM(cfg)).double()
    nm = build_norm_map(model)
    inner = [n.name for n in nm.norms if n.role == "inner"]
    assert inner and all("q_layernorm" in n or "k_layernorm" in n for n in inner)
    x = model_inputs(model)
    ref = model(**x).logits.log_softmax(-1)
    work = copy.deepcopy(model)
    plan = plan_rms_conversion(work, build_norm_map(work), "rmsnorm")
    assert not set(inner) & set(plan.replace)
    apply_rms_plan(work, plan)
    assert isinstance(work.get_submodule(inner[0]), torch.nn.LayerNorm)
    assert (work(**x).logits.log_softmax(-1) - ref).abs().max() < 1e-10


class HandRolledLN(torch.nn.Module):
    """A LayerNorm written by hand under an unhelpful name: found by what it computes."""

    def __init__(self, d):
        super().__init__()
        self.g = torch.nn.Parameter(1 + 0.5 * torch.randn(d))
        self.b = torch.nn.Parameter(0.5 * torch.randn(d))
        self.weight, self.bias = self.g, self.b
        self.eps = 1e-5

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.g + self.b


class TinyPreLN(torch.nn.Module):
    """A plain-torch Pre-LN language model; ``positions_after_norm`` makes it a shortformer."""

    def __init__(self, d=16, vocab=40, positions_after_norm=False, peri=False):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(32, d)
        self.n1 = HandRolledLN(d)
        self.up = torch.nn.Linear(d, 4 * d)
        self.down = torch.nn.Linear(4 * d, d)
        self.out_norm = HandRolledLN(d) if peri else None
        self.nf = HandRolledLN(d)
        self.head = torch.nn.Linear(d, vocab)
        self.after = positions_after_norm

    def forward(self, input_ids):
        p = self.pos(torch.arange(input_ids.shape[1]))[None]
        h = self.tok(input_ids) if self.after else self.tok(input_ids) + p
        n = self.n1(h)
        if self.after:
            n = n + p
        m = self.down(torch.relu(self.up(n)))
        h = h + (self.out_norm(m) if self.out_norm is not None else m)
        return self.head(self.nf(h))

    def example_inputs(self):
        return {"input_ids": torch.randint(0, 40, (1, 6))}


def test_custom_norm_class_is_recognised_by_behaviour():
    kind = classify_norm(HandRolledLN(8))
    assert kind is not None and kind.family == "layernorm" and kind.eps == 1e-5


def test_plain_torch_model_with_custom_norms_converts_exactly():
    torch.manual_seed(0)
    model = TinyPreLN().double().eval()
    nm = build_norm_map(model)
    assert {n.name: n.role for n in nm.norms} == {"n1": "pre", "nf": "final"}
    ids = torch.randint(0, 40, (2, 9))
    ref = model(ids).log_softmax(-1)
    plan = plan_rms_conversion(model, nm, "crmsnorm")
    apply_rms_plan(model, plan)
    assert (model(ids).log_softmax(-1) - ref).abs().max() < 1e-10


def test_positions_added_after_the_norm_keep_that_norms_affine_and_convert_exactly():
    """Shortformer: positions are added to the norm's output, which only its block reads (it is not the
    stream), so the norm keeps its gain and shift and the rest converts exactly."""
    model = TinyPreLN(positions_after_norm=True).eval().double()
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = model(ids).log_softmax(-1)
    nm = build_norm_map(model)
    assert nm.norm("n1").role == "pre" and nm.norm("n1").keep_affine
    plan = plan_rms_conversion(model, nm, "rmsnorm")
    assert plan.kept_gain == ["n1"]
    apply_rms_plan(model, plan)
    assert (model(ids).log_softmax(-1) - ref).abs().max() < 1e-10


def test_peri_ln_output_norm_is_detected_and_refused():
    model = TinyPreLN(peri=True).eval()
    nm = build_norm_map(model)
    assert nm.norm("out_norm").role == "output"
    assert nm.placement == "peri-ln"
    with pytest.raises(UnsupportedModel, match="Peri-LN"):
        plan_rms_conversion(model, nm, "rmsnorm")


def test_raw_stream_read_without_norm_is_refused():
    class Leaky(TinyPreLN):
        def forward(self, input_ids):
            h = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1]))[None]
            h = h + self.down(torch.relu(self.up(self.n1(h))))
            return self.head(self.nf(h)) + self.head(h)  # the head also reads the raw stream

    model = Leaky().eval()
    with pytest.raises(UnsupportedModel, match="without a norm"):
        plan_rms_conversion(model, build_norm_map(model), "rmsnorm")


def test_bloom_embedding_norm_is_baked():
    nm = build_norm_map(build("bloom"))
    assert nm.norm("transformer.word_embeddings_layernorm").role == "embedding"
    plan = plan_rms_conversion(build("bloom"), nm, "rmsnorm")
    assert plan.bake == [("transformer.word_embeddings_layernorm", "transformer.word_embeddings")]
    assert not plan.stock_loadable


def test_cnn_inspects_with_batchnorms_and_no_rms_recipe():
    cfg = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = randomise(T.ResNetForImageClassification(cfg))
    nm = build_norm_map(model)
    roles = {n.role for n in nm.norms}
    assert roles == {"batchnorm"} and len(nm.norms) == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with pytest.raises(UnsupportedModel, match="no norm on the residual stream"):
        plan_rms_conversion(model, nm, "rmsnorm")


class Pooled(torch.nn.Module):
    """Pre-LN; the final norm is pooled over tokens before the classifier: max pooling (not linear: the
    norm keeps its affine) or mean pooling (linear over tokens: the affine folds through it)."""

    def __init__(self, d: int = 8, pool: str = "amax"):
        super().__init__()
        self.emb, self.ln1, self.fc = torch.nn.Embedding(20, d), torch.nn.LayerNorm(d), torch.nn.Linear(d, d)
        self.lnf, self.head = torch.nn.LayerNorm(d), torch.nn.Linear(d, 3)
        self.pool = pool
        gen = torch.Generator().manual_seed(0)
        for ln in (self.ln1, self.lnf):
            ln.weight.data = 1 + 0.5 * torch.randn(d, generator=gen)
            ln.bias.data = 0.5 * torch.randn(d, generator=gen)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.fc(self.ln1(x))
        return self.head(getattr(self.lnf(x), self.pool)(1))

    def example_inputs(self):
        return {"ids": torch.randint(0, 20, (2, 5))}


def test_a_norm_read_by_max_pooling_keeps_its_affine_and_the_rest_converts_exactly():
    import copy

    from normsurgeon.transforms.apply import apply_rms_plan
    from normsurgeon.transforms.plan import plan_rms_conversion

    model = Pooled(pool="amax").double().eval()
    ids = torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(1))
    nm = build_norm_map(model)
    assert nm.norm("lnf").keep_affine and not nm.norm("lnf").problems
    plan = plan_rms_conversion(model, nm, "rmsnorm")
    assert plan.kept_gain == ["lnf"] and any(f.norm == "ln1" and f.fold_gain for f in plan.folds)
    work = copy.deepcopy(model)
    apply_rms_plan(work, plan)
    assert (work(ids) - model(ids)).abs().max().item() < 1e-12  # float64
    with pytest.raises(UnsupportedModel, match="cannot have its affine folded"):
        plan_rms_conversion(model, nm, "crmsnorm")


def test_mean_pooling_is_linear_over_tokens_so_the_affine_folds_through_it():
    import copy

    from normsurgeon.transforms.apply import apply_rms_plan
    from normsurgeon.transforms.plan import plan_rms_conversion

    model = Pooled(pool="mean").double().eval()
    ids = torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(1))
    nm = build_norm_map(model)
    assert nm.norm("lnf").readers[0].name == "head" and not nm.norm("lnf").keep_affine
    plan = plan_rms_conversion(model, nm, "crmsnorm")
    work = copy.deepcopy(model)
    apply_rms_plan(work, plan)
    assert (work(ids) - model(ids)).abs().max().item() < 1e-12


def test_a_shape_only_read_of_the_stream_is_not_a_raw_read():
    """mBART hands ``inputs_embeds[..., -1]`` to its positions module for the shape only."""
    cfg = T.MBartConfig(vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    nm = build_norm_map(T.MBartForConditionalGeneration(cfg).eval())
    assert nm.stream_problems == []
