"""Every supported family through the same steps at equal settings, on tiny random models (CPU, seconds): what each
step costs and changes. Random weights: the output changes say that the mechanics work alike across families, not how
good a real model stays (SmolLM2 is the quality test).

    python eval/tiny_families.py --out eval/results/tiny_families_cpu.json

Settings: 4 layers, hidden 128, 8 heads / 4 KV heads, head_dim 16, MLP 256 (MoE: 8 experts of 128, top-2);
prune 50 % of heads and channels by element1 on 8 x 64 tokens, uniform (MoE: also 50 % of the experts by REAP), LoRA
10 steps, GPTQ W4 g32 on 16 x 64 tokens. Output change: mean |Δlogit| / mean |logit| against the previous step, on
4 x 64 held-out tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import compress
from compress.architectures import family

SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=16, tie_word_embeddings=True)
EXTRA = {
    "llama": {}, "qwen3": {}, "phi3": dict(pad_token_id=0, eos_token_id=1, bos_token_id=1),
    "gemma3_text": dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2,
                        query_pre_attn_scalar=16),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=128),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, decoder_sparse_step=1),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                      shared_expert_intermediate_size=256),
}


def _change(model, reference_logits, ids) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return round(((logits - reference_logits).abs().mean() / reference_logits.abs().mean()).item(), 4), logits


def run(kind: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, 512, (16, 64), generator=generator)
    held_out = torch.randint(0, 512, (4, 64), generator=generator)
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, **{**SHAPE, **EXTRA[kind]})
    model = AutoModelForCausalLM.from_config(config).eval()
    row = {"family": kind, "params": sum(p.numel() for p in model.parameters())}
    with torch.no_grad():
        logits = model(input_ids=held_out).logits
    moe = family(model).mlp == "experts"
    steps = [
        ("prune", lambda m: compress.prune(m, compress.TaylorPrune(ratio=0.5, multiple=16, uniform=True,
                                                                   experts=0.5 if moe else 0.0),
                                           calibration[:8], show_progress=False)),
        ("finetune", lambda m: compress.finetune(m, compress.LoRARecovery(steps=10, batch_size=4, lr=1e-3),
                                                 calibration, show_progress=False)),
        ("gptq", lambda m: compress.quantize(m, compress.GPTQ(bits=4, group_size=32), calibration,
                                             show_progress=False)),
    ]
    for name, step in steps:
        start = time.perf_counter()
        model = step(model) or model
        row[f"{name}_seconds"] = round(time.perf_counter() - start, 2)
        row[f"{name}_output_change"], logits = _change(model, logits, held_out)
    row["params_after"] = sum(p.numel() for p in model.parameters())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(EXTRA))
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for kind in args.families.split(","):
        rows.append(run(kind))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
