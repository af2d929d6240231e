"""``normsurgeon fold-bn`` end to end: output folder, stock reload, deploy form, torch.export, exit codes."""
from __future__ import annotations

import json

import torch
import transformers as T
from bn_helpers import randomise
from typer.testing import CliRunner

from normsurgeon.batchnorm.deploy import count_batch_norm_ops, load_deploy
from normsurgeon.cli import app

runner = CliRunner()


def test_fold_bn_hf_folder(tmp_path):
    torch.manual_seed(0)
    src = randomise(T.ResNetForImageClassification(T.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck", num_labels=5)))
    src.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    res = runner.invoke(app, ["fold-bn", str(tmp_path / "src"), "-o", str(out), "--image-size", "32", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "equivalence_report.json").read_text())
    assert report["batchnorm"]["counts"] == {"folded": 8, "merged": 0, "left": 0}
    assert report["deploy_export"]["batch_norm_ops"] == 0
    x = torch.randn(2, 3, 32, 32)
    stock = T.ResNetForImageClassification.from_pretrained(out).eval()  # stock class, no remote code
    deploy = load_deploy(out)
    assert not any("BatchNorm" in type(m).__name__ for m in deploy.modules())
    program = torch.export.load(str(out / "deploy" / "model.pt2"))
    assert count_batch_norm_ops(program) == 0
    with torch.no_grad():
        ref = src(pixel_values=x).logits
        for got in (stock(pixel_values=x).logits, deploy(pixel_values=x).logits,
                    program.module()(pixel_values=x).logits):
            assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    again = runner.invoke(app, ["fold-bn", str(tmp_path / "src"), "-o", str(out)])
    assert again.exit_code == 2  # output exists


def test_fold_bn_factory_and_bad_input(tmp_path):
    out = tmp_path / "f"
    res = runner.invoke(app, ["fold-bn", "normsurgeon.batchnorm.examples:conv_bn_net", "-o", str(out),
                              "--input-shape", "2,3,8,8", "--no-export"])
    assert res.exit_code == 0, res.output
    model = load_deploy(out)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 1  # the padded-conv one is left
    assert runner.invoke(app, ["fold-bn", "normsurgeon.batchnorm.examples:conv_bn_net", "-o",
                               str(tmp_path / "g")]).exit_code == 2  # no --input-shape
    assert runner.invoke(app, ["fold-bn", str(tmp_path / "missing"), "-o", str(tmp_path / "h")]).exit_code == 5
