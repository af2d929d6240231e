"""Peer: TransformerLens (4.x) folding LayerNorm and centring the writers of the same GPT-2 checkpoint.

Run with an interpreter that has transformer_lens (never a normsurgeon dependency), e.g.
    /tmp/tlvenv/bin/python benchmarks/peer_transformer_lens.py /work/bench/gpt2 --dtype float32

TransformerLens 4 removed ``HookedTransformer``; ``TransformerBridge.boot_transformers`` +
``enable_compatibility_mode()`` is its documented HookedTransformer-equivalent processing (fold_ln,
center_writing_weights, center_unembed, fold_value_biases). The HF model is loaded from the local
folder and handed to the bridge, so nothing is downloaded. Prints one JSON line.
"""
from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-eval", action="store_true", help="stop after processing (for whole-process timing)")
    ap.add_argument("--eval-dtype", default=None, help="evaluate processed and reference models in this dtype "
                    "(float64: the processing's own error, without float32 forward round-off)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    import transformers as T
    from transformer_lens.model_bridge import TransformerBridge

    t0 = time.perf_counter()
    hf = T.GPT2LMHeadModel.from_pretrained(str(a.folder), dtype=dtype).eval()
    bridge = TransformerBridge.boot_transformers(str(a.folder), hf_model=hf, tokenizer=None, dtype=dtype)
    t1 = time.perf_counter()
    bridge.enable_compatibility_mode()  # fold_ln + center_writing_weights + center_unembed + fold_value_biases
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    timing = {"import_s": round(t0 - T_START, 2), "load_s": round(t1 - t0, 2), "process_s": round(t2 - t1, 2),
              "total_s": round(t2 - t0, 2)}
    if a.no_eval:
        print(json.dumps({"tool": "transformer_lens", "dtype": a.dtype, **timing, "peak_rss_bytes": peak}))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from normsurgeon.verification.inputs import random_token_batches
    from normsurgeon.verification.metrics import output_metrics

    ids = random_token_batches(hf.config.vocab_size, 4, 64, 0)[0]["input_ids"]
    ref_model = T.GPT2LMHeadModel.from_pretrained(str(a.folder), dtype=dtype).eval()
    if a.eval_dtype:
        bridge.to(getattr(torch, a.eval_dtype))
        ref_model.to(getattr(torch, a.eval_dtype))
    with torch.no_grad():
        ref = ref_model(ids).logits
        out = bridge(ids)
    m = output_metrics(ref, out)
    print(json.dumps({"tool": "transformer_lens", "dtype": a.dtype, "eval_dtype": a.eval_dtype or a.dtype, **timing,
                      "peak_rss_bytes": peak,
                      "max_abs_logprob": m["max_abs_logprob"], "mean_kl": m["mean_kl"],
                      "top1_agreement": m["top1_agreement_all"]}))


if __name__ == "__main__":
    main()
