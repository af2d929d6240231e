"""Example inputs built from the model itself (normsurgeon/io/example_inputs.py), on tiny random models.

Every architecture must run on its example inputs (also at its longest sequence), the inputs must be
deterministic for a seed, and the norm map must trace them (a refusal is fine, a crash is not).
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

from normsurgeon.errors import InputError, NormSurgeonError
from normsurgeon.graph.normmap import build_norm_map
from normsurgeon.io.example_inputs import example_inputs, max_seq_len, random_batches
from normsurgeon.verification.inputs import default_batches
from normsurgeon.verification.runner import compare_models

D, L, H, F, V, P = 32, 2, 4, 64, 96, 32  # width, layers, heads, ffn, vocab, positions
ENC_DEC = dict(vocab_size=V, d_model=D, encoder_layers=L, decoder_layers=L, encoder_attention_heads=H,
               decoder_attention_heads=H, encoder_ffn_dim=F, decoder_ffn_dim=F, max_position_embeddings=P)
BERTISH = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=F,
               max_position_embeddings=P)
VIT = dict(image_size=16, patch_size=4, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
           intermediate_size=F)
AUDIO = dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=F, conv_dim=(16, 16),
             conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
             vocab_size=V)


class PlainNet(torch.nn.Module):
    """A plain torch module that says what it takes."""

    def __init__(self):
        super().__init__()
        self.norm, self.head = torch.nn.LayerNorm(D), torch.nn.Linear(D, 4)

    def forward(self, x):
        return self.head(self.norm(x))

    def example_inputs(self):
        return torch.randn(2, 5, D)


ZOO = {
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_positions=P, n_embd=D, n_layer=L, n_head=H)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=V, max_position_embeddings=P, hidden_size=D,
                                                num_hidden_layers=L, num_attention_heads=H, ffn_dim=F,
                                                word_embed_proj_dim=D, pad_token_id=1)),
    "roberta": lambda: T.RobertaForMaskedLM(T.RobertaConfig(**BERTISH, pad_token_id=1)),
    "xlm_roberta_xl": lambda: T.XLMRobertaXLForMaskedLM(T.XLMRobertaXLConfig(**BERTISH, pad_token_id=1)),
    "esm": lambda: T.EsmForMaskedLM(T.EsmConfig(**{**BERTISH, "vocab_size": 33}, pad_token_id=1, mask_token_id=32,
                                                position_embedding_type="absolute")),
    "bert": lambda: T.BertForMaskedLM(T.BertConfig(**BERTISH)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=V, d_model=D, d_ff=F, num_layers=L,
                                                          num_heads=H, d_kv=D // H)),
    "pegasus": lambda: T.PegasusForConditionalGeneration(T.PegasusConfig(**ENC_DEC)),
    "marian": lambda: T.MarianMTModel(T.MarianConfig(**ENC_DEC, pad_token_id=V - 1, decoder_start_token_id=V - 1)),
    "m2m100": lambda: T.M2M100ForConditionalGeneration(T.M2M100Config(**ENC_DEC)),
    "mbart": lambda: T.MBartForConditionalGeneration(T.MBartConfig(**ENC_DEC)),
    "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(**ENC_DEC)),
    "whisper": lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
        **{**ENC_DEC, "max_position_embeddings": None}, num_mel_bins=8, max_source_positions=16,
        max_target_positions=P, pad_token_id=V - 1, bos_token_id=V - 2, eos_token_id=V - 2,
        decoder_start_token_id=V - 3, begin_suppress_tokens=None, suppress_tokens=None)),
    "wav2vec2": lambda: T.Wav2Vec2ForCTC(T.Wav2Vec2Config(**AUDIO, do_stable_layer_norm=True,
                                                          feat_extract_norm="layer")),
    "hubert": lambda: T.HubertModel(T.HubertConfig(**AUDIO)),
    "wav2vec2_conformer": lambda: T.Wav2Vec2ConformerModel(T.Wav2Vec2ConformerConfig(
        **AUDIO, conv_depthwise_kernel_size=7)),
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig(**VIT, num_labels=5)),
    "beit": lambda: T.BeitForImageClassification(T.BeitConfig(**VIT, num_labels=5)),
    "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(**VIT)),
    "videomae": lambda: T.VideoMAEForVideoClassification(T.VideoMAEConfig(**VIT, num_frames=4, tubelet_size=2,
                                                                         num_labels=5)),
    "resnet": lambda: T.ResNetForImageClassification(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                                                    depths=[1, 1], num_labels=5)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**BERTISH)),
    "xglm": lambda: T.XGLMForCausalLM(T.XGLMConfig(vocab_size=V, d_model=D, num_layers=L, attention_heads=H,
                                                   ffn_dim=F, max_position_embeddings=P, pad_token_id=1)),
    "plain": PlainNet,
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return ZOO[name]().eval()


NAMES = sorted(ZOO)
HF = [n for n in NAMES if n != "plain"]


@pytest.mark.parametrize("name", NAMES)
def test_model_runs_on_its_example_inputs(name):
    model = build(name)
    with torch.no_grad():
        model(**example_inputs(model))


@pytest.mark.parametrize("name", NAMES)
def test_inputs_are_deterministic_for_a_seed(name):
    model = build(name)
    a, b, c = (example_inputs(model, batch=2, seed=s) for s in (0, 0, 1))
    assert a.keys() == b.keys() == c.keys()
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert all(torch.equal(a[k], b[k]) for k in tensors)
    assert any(not torch.equal(a[k], c[k]) for k in tensors)


# Position limits with their offsets: RoBERTa-style tables start after the pad id (pad 1 + 1).
LIMITS = {"gpt2": P, "opt": P, "roberta": P - 2, "xlm_roberta_xl": P - 2, "esm": P - 2, "bert": P, "pegasus": P,
          "marian": P, "m2m100": P, "mbart": P, "bart": P, "whisper": P, "llama": P, "xglm": P, "t5": None}


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_position_limits_count_offsets(name):
    assert max_seq_len(build(name)) == LIMITS[name]


@pytest.mark.parametrize("name", HF)
def test_longest_inputs_run_through_verification(name):
    """default_batches at the longest sequence the model allows, compared by the runner (use_cache
    only where the forward takes it)."""
    model = build(name)
    limit = max_seq_len(model)
    batches = default_batches(model, None, num=2, seq_len=10_000 if limit else 16, seed=0)
    ids = batches[0].get("input_ids", batches[0].get("decoder_input_ids"))
    if limit and ids is not None:
        assert ids.shape == (2, limit)
    result = compare_models(model, copy.deepcopy(model), batches, torch.float32, [])
    assert result["metrics"]["max_abs_logprob"] == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_norm_map_traces_the_example_inputs(name):
    assert build_norm_map(build(name)).norms


def test_pad_id_avoided_and_decoder_starts_with_its_start_token():
    x = example_inputs(build("roberta"), batch=4, seq_len=30)
    assert (x["input_ids"] != 1).all()
    x = example_inputs(build("marian"), batch=2)
    assert (x["decoder_input_ids"][:, 0] == V - 1).all() and (x["decoder_input_ids"][:, 1:] != V - 1).all()
    assert x["use_cache"] is False


def test_audio_and_video_shapes():
    whisper = example_inputs(build("whisper"), batch=2)
    assert whisper["input_features"].shape == (2, 8, 32) and whisper["decoder_input_ids"][0, 0] == V - 3
    w2v = build("wav2vec2")
    samples = random_batches(w2v, 2, 5, seed=0)[0]["input_values"]  # [B, samples] for 5 frames
    assert w2v._get_feat_extract_output_lengths(samples.shape[1]) == 5
    assert example_inputs(build("videomae"))["pixel_values"].shape == (1, 4, 3, 16, 16)
    assert example_inputs(build("resnet"))["pixel_values"].shape == (1, 3, 64, 64)


def test_floating_inputs_follow_the_model_dtype():
    model = build("whisper").double()
    assert example_inputs(model)["input_features"].dtype == torch.float64
    assert example_inputs(model, dtype=torch.float32)["input_features"].dtype == torch.float32
    assert example_inputs(build("plain"))["x"].shape == (2, 5, D)  # a bare tensor keyed by its argument


def test_fold_bn_builds_audio_inputs():
    from normsurgeon.batchnorm.run import example_batches

    model = build("wav2vec2_conformer")
    (batch,) = example_batches(model, None, None, 2, 0)
    with torch.no_grad():
        model(**batch)


def test_an_input_that_cannot_be_built_is_a_one_line_input_error():
    with pytest.raises(InputError, match=r"^cannot build example inputs for Linear: a plain torch module needs"):
        example_inputs(torch.nn.Linear(2, 2))
    model = build("gpt2")
    model.main_input_name = "speech"
    with pytest.raises(InputError, match="GPT2LMHeadModel: its forward takes no `speech`"):
        example_inputs(model)
