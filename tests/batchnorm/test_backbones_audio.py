"""fold-bn beyond classifiers: backbones (``BackboneOutput``), depth estimation (``DepthEstimatorOutput``),
Wav2Vec2-Conformer (Conv1d + BatchNorm1d), a QuartzNet-style Conv1d model, and BNs that cannot fold.

Random weights *and* randomised BN statistics/affine (``randomise``). Every floating output tensor is
compared (each feature map, the depth map, hidden states...): float64 max|delta| <= 1e-10 * its scale, the
source dtype (float32) within the fold-bn verification's tolerance (1e-4 * scale).
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from bn_helpers import actions, randomise
from typer.testing import CliRunner

import normsurgeon
from normsurgeon.batchnorm.examples import quartznet_like
from normsurgeon.batchnorm.fold import copy_f64, fold_batchnorms
from normsurgeon.batchnorm.run import run_fold_bn
from normsurgeon.batchnorm.units import candidates, is_bn_like
from normsurgeon.batchnorm.verify_fold import REL_TOL, output_tensors
from normsurgeon.cli import app
from normsurgeon.io.example_inputs import example_inputs

TOL64_REL = 1e-10
TOL32_REL = REL_TOL["float32"]

_CONFORMER = dict(vocab_size=12, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                  num_conv_pos_embedding_groups=2, conv_depthwise_kernel_size=5, mask_time_prob=0.0)


def resnet_backbone():
    return T.ResNetBackbone(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16], depths=[1, 2, 1],
                                           layer_type="bottleneck", out_features=["stem", "stage1", "stage2", "stage3"]))


def rtdetr_backbone():
    return T.RTDetrResNetBackbone(T.RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16], depths=[1, 1, 1],
                                                       layer_type="bottleneck",
                                                       out_features=["stage1", "stage2", "stage3"]))


def dpt_hybrid():
    """DPT-hybrid: BiT backbone (GroupNorm, no BN) + ViT; the BNs are in the fusion residual units."""
    bit = T.BitConfig(global_padding="same", layer_type="bottleneck", depths=[1, 1, 1], embedding_size=8,
                      hidden_sizes=[16, 32, 64], num_groups=2, out_features=["stage1", "stage2", "stage3"])
    m = T.DPTForDepthEstimation(T.DPTConfig(
        is_hybrid=True, backbone_config=bit, image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, backbone_featmap_shape=[1, 64, 2, 2],
        neck_hidden_sizes=[16, 32, 16, 16], fusion_hidden_size=8, reassemble_factors=[1, 1, 1, 0.5],
        readout_type="project", backbone_out_indices=[0, 0, 0, 1], use_batch_norm_in_fusion_residual=True))
    return m


def conformer_ctc(**kw):
    return T.Wav2Vec2ConformerForCTC(T.Wav2Vec2ConformerConfig(**_CONFORMER, **kw))


def _prepare(name: str, make):
    torch.manual_seed(0)
    model = make()
    if name == "dpt_hybrid":  # HF's std-0.02 init shrinks the signal through the head: PyTorch's default init
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.reset_parameters()
    model = randomise(model)
    if name == "dpt_hybrid":  # the depth head ends in ReLU: lift its last bias so the depth map is not all 0
        with torch.no_grad():
            model.head.head[4].bias.fill_(0.5)
    return model


HF = {"resnet_backbone": (resnet_backbone, 32, {"folded": 15, "left": 0}),
      "rtdetr_resnet_backbone": (rtdetr_backbone, 32, {"folded": 14, "left": 0}),
      # the first fusion layer has no residual input: its residual_layer1 (2 BNs) is never called, so left
      "dpt_hybrid": (dpt_hybrid, 32, {"folded": 14, "left": 2}),
      "wav2vec2_conformer_ctc": (conformer_ctc, None, {"folded": 2, "left": 0}),
      "wav2vec2_conformer_rotary": (lambda: conformer_ctc(position_embeddings_type="rotary"), None,
                                    {"folded": 2, "left": 0})}


def _inputs(model, image_size):
    if getattr(model, "config", None) is None:
        return dict(zip(["x"], model.example_inputs()))
    return example_inputs(model, batch=2, seq_len=24, image_size=image_size)


def _run(model, x):
    to64 = next(model.parameters()).dtype == torch.float64
    with torch.no_grad():
        return output_tensors(model(**{k: v.double() if to64 and v.is_floating_point() else v for k, v in x.items()}))


def every_output_error(model, result, x) -> dict:
    """Worst relative error over every floating output tensor, per form; asserts the set of outputs agrees.
    The float64 copy is made before the source runs (a cache the source fills in float32, such as
    Wav2Vec2-Conformer's rotary table, would otherwise be copied at float32 precision)."""
    src64 = copy_f64(model)
    ref, ref64 = _run(model, x), _run(src64, x)
    forms = {"f64": (ref64, _run(result.deploy64, x)), "stock": (ref, _run(result.stock, x)),
             "deploy": (ref, _run(result.deploy, x))}
    worst = {}
    for form, (a, b) in forms.items():
        assert a.keys() == b.keys(), (form, a.keys(), b.keys())
        errs = {}
        for k in a:
            scale = a[k].abs().max().item()
            assert scale > 0, f"bad test setup: output {k} is all zeros"
            errs[k] = (a[k].double() - b[k].double()).abs().max().item() / scale
        worst[form] = max(errs.values())
        worst[f"{form}_at"] = max(errs, key=errs.get)
    worst["outputs"] = sorted(ref)
    return worst


def _bn_sensitive(model, x) -> bool:
    """The outputs depend on the BNs (so the check above is not vacuous)."""
    bumped = copy.deepcopy(model)
    with torch.no_grad():
        for m in bumped.modules():
            if is_bn_like(m) and isinstance(getattr(m, "bias", None), torch.Tensor):
                m.bias.add_(0.5)
    a, b = _run(model, x), _run(bumped, x)
    return any((a[k] - b[k]).abs().max() > 1e-4 * a[k].abs().max() for k in a)


@pytest.mark.parametrize("name", sorted(HF))
def test_hf_backbones_depth_audio_fold_exactly(name):
    make, size, want = HF[name]
    model = _prepare(name, make)
    x = _inputs(model, size)
    r = fold_batchnorms(model, (), x)
    assert {e["name"] for e in r.entries} == set(candidates(model))
    assert {k: r.counts[k] for k in want} == want, [e for e in r.entries if e["action"] == "left"]
    assert all("not called" in e["reason"] for e in r.entries if e["action"] == "left")
    e = every_output_error(model, r, x)
    assert e["f64"] <= TOL64_REL and e["stock"] <= TOL32_REL and e["deploy"] <= TOL32_REL, e
    assert _bn_sensitive(model, x)
    if name == "resnet_backbone":
        assert e["outputs"] == [f"feature_maps.{i}" for i in range(4)]
    if name == "dpt_hybrid":
        assert e["outputs"] == ["predicted_depth"]


def test_quartznet_like_conv1d_folds_exactly():
    """Depthwise (dilated, padded, strided) + pointwise Conv1d + BatchNorm1d + ReLU, residual BN, a feature
    BN folded forward into a grouped valid conv, a BN right after a depthwise conv: all fold exactly."""
    model = quartznet_like()
    x = _inputs(model, None)
    r = fold_batchnorms(model, (), x)
    assert r.counts == {"folded": 10, "merged": 0, "left": 0}, [e for e in r.entries if e["action"] == "left"]
    into = {e["name"]: (e["into"], e["direction"]) for e in r.entries}
    assert into["feature_norm"] == ("group_conv", "into the following conv")
    assert into["epilogue.1"] == ("epilogue.0", "into the preceding conv")  # depthwise, dilation 2, padding 6
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in r.deploy.modules())
    e = every_output_error(model, r, x)
    assert e["f64"] <= TOL64_REL and e["stock"] <= TOL32_REL and e["deploy"] <= TOL32_REL, e
    assert _bn_sensitive(model, x)


# --------------------------------------------------------------------------------------------- CLI
runner = CliRunner()


def _same_outputs(a, b, x, tol=TOL32_REL):
    ra, rb = _run(a, x), _run(b, x)
    assert ra.keys() == rb.keys()
    for k in ra:
        assert (ra[k] - rb[k]).abs().max() <= tol * ra[k].abs().max(), k


@pytest.mark.parametrize("name, flags", [("resnet_backbone", ["--image-size", "32"]),
                                         ("wav2vec2_conformer_ctc", []),
                                         ("wav2vec2_conformer_model", ["--input-shape", "2,1600", "--no-export"])])
def test_cli_fold_bn_backbone_and_conformer(name, flags, tmp_path):
    if name == "wav2vec2_conformer_model":
        torch.manual_seed(0)
        src = randomise(T.Wav2Vec2ConformerModel(T.Wav2Vec2ConformerConfig(**_CONFORMER)))
    else:
        src = _prepare(name, HF[name][0])
    src.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    res = runner.invoke(app, ["fold-bn", str(tmp_path / "src"), "-o", str(out), "--json", *flags])
    assert res.exit_code == 0, res.output
    import json
    report = json.loads((out / "equivalence_report.json").read_text())
    assert report["batchnorm"]["counts"]["left"] == 0 and report["batchnorm"]["counts"]["folded"] > 0
    compared = report["fold_metrics"]["deploy"]["outputs_compared"]
    assert compared == {"resnet_backbone": 4, "wav2vec2_conformer_ctc": 1, "wav2vec2_conformer_model": 2}[name]
    x = _inputs(src, 32) if name == "resnet_backbone" else {"input_values": torch.randn(2, 1600)}
    deploy = normsurgeon.load(str(out)).model
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in deploy.modules())
    stock = normsurgeon.load(str(out), stock=True).model
    _same_outputs(src, deploy, x)
    _same_outputs(src, stock, x)
    if "--no-export" not in flags:
        assert report["deploy_export"]["batch_norm_ops"] == 0, report["deploy_export"]
        program = torch.export.load(str(out / "deploy" / "model.pt2")).module()
        x_exp = _inputs(src, 32) if name == "resnet_backbone" else example_inputs(src, batch=2, seq_len=16)
        _same_outputs(src, program, x_exp)


def test_cli_quartznet_factory_uses_its_example_inputs(tmp_path):
    out = tmp_path / "q"
    res = runner.invoke(app, ["fold-bn", "normsurgeon.batchnorm.examples:quartznet_like", "-o", str(out), "--no-export"])
    assert res.exit_code == 0, res.output
    src = quartznet_like()
    x = _inputs(src, None)
    _same_outputs(src, normsurgeon.load(str(out)).model, x)
    _same_outputs(src, normsurgeon.load(str(out), stock=True).model, x)


# ------------------------------------------------------------------------------------ not foldable
class _Holder(torch.nn.Module):
    """Holds BNs but is never called itself (its members are)."""

    def __init__(self, c):
        super().__init__()
        self.a, self.b = torch.nn.BatchNorm2d(c), torch.nn.BatchNorm2d(c)


class _WSConv(torch.nn.Conv2d):
    """Weight-standardized conv (BiT style): folding a BN's scale into its weight is undone by the forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return torch.nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Unfoldable(torch.nn.Module):
    """BN after a ReLU before a padded conv; a BN feeding two branches; members of a never-called holder
    (foldable); a BN after a weight-standardized conv; a plain conv+BN (foldable)."""

    def __init__(self, c=6):
        super().__init__()
        nn = torch.nn
        self.conv0 = nn.Conv2d(3, c, 3, padding=1)
        self.bn_after_relu = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn_two_branches = nn.BatchNorm2d(c)
        self.left, self.right = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 3, padding=1)
        self.holder = _Holder(c)
        self.conv2, self.conv3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.Conv2d(c, c, 1, bias=False)
        self.ws = _WSConv(c, c, 3, padding=1, bias=False)
        self.bn_after_ws = nn.BatchNorm2d(c)
        self.conv4 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn_plain = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        h = self.bn_after_relu(torch.relu(self.conv0(x)))
        h = self.bn_two_branches(torch.relu(self.conv1(h)))
        h = torch.relu(self.left(h) + self.right(h))
        h = torch.relu(self.holder.a(self.conv2(h)))
        h = torch.relu(self.holder.b(self.conv3(h)))
        h = torch.relu(self.bn_after_ws(self.ws(h)))
        h = torch.relu(self.bn_plain(self.conv4(h)))
        return self.head(h.mean(dim=(2, 3)))

    def example_inputs(self):
        return (torch.randn(2, 3, 12, 12),)


def unfoldable():
    torch.manual_seed(0)
    return randomise(Unfoldable())


def test_unfoldable_bns_are_left_with_a_reason():
    model = unfoldable()
    x = {"x": torch.randn(2, 3, 12, 12)}
    r = fold_batchnorms(model, (), x)
    acts = actions(r)
    assert acts == {"bn_after_relu": "left", "bn_two_branches": "left", "holder.a": "folded", "holder.b": "folded",
                    "bn_after_ws": "left", "bn_plain": "folded"}, acts
    reason = {e["name"]: e.get("reason") or "" for e in r.entries}
    assert "relu" in reason["bn_after_relu"] and "zero-pads" in reason["bn_after_relu"]
    assert "several layers" in reason["bn_two_branches"]
    assert "does not reproduce" in reason["bn_after_ws"]
    left = {n for n, m in r.deploy.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert left == {"bn_after_relu", "bn_two_branches", "bn_after_ws"}
    e = every_output_error(model, r, x)
    assert e["f64"] <= TOL64_REL and e["stock"] <= TOL32_REL and e["deploy"] <= TOL32_REL, e


def test_unfoldable_model_runs_through_run_fold_bn(tmp_path):
    report = run_fold_bn("test_backbones_audio:unfoldable", tmp_path / "o", export=False)
    assert report["status"] == "pass" and report["batchnorm"]["counts"]["left"] == 3


def no_bn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3), torch.nn.ReLU()).eval()


def test_a_model_without_batchnorm_passes_with_a_warning(tmp_path):
    report = run_fold_bn("test_backbones_audio:no_bn", tmp_path / "o", input_shape=(2, 4, 9), export=False,
                         dry_run=True)
    assert report["status"] == "pass" and report["batchnorm"]["counts"] == {"folded": 0, "merged": 0, "left": 0}
    assert any("no BatchNorm" in w for w in report["warnings"])
