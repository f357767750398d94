"""Prune and recover in your own Python code: LLM-Pruner's 25 % structured pruning (Taylor importance) on a model
you already hold, LoRA recovery on your own text, and the cost of each step in WikiText-2 perplexity.

    python examples/prune_and_recover.py --steps 300        # ~1 min on a GPU; --steps 4 for a quick look on CPU
"""

import argparse

import compress
from compress.data import calibration_batches, training_windows

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=300, help="LoRA recovery steps")
parser.add_argument("--output-dir", default="smollm2-pruned-recovered")
parser.add_argument("--ppl-tokens", type=int, default=4096, help="WikiText-2 test tokens scored")
args = parser.parse_args()

model, tokenizer = compress.load_model("smollm2-135m")  # or any Llama-family transformers model
protocol = compress.Perplexity(seq_len=512, max_tokens=args.ppl_tokens)


def report(stage: str) -> None:
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{stage}: {params:.1f} M parameters, WikiText-2 perplexity "
          f"{compress.perplexity(model, tokenizer, protocol)['perplexity']:.2f}")


report("base")
calibration = calibration_batches(tokenizer, "wikitext2-valid", samples=10, seq_len=128)  # LLM-Pruner: 10 samples
model = compress.prune(model, compress.TaylorPrune(ratio=0.25, layers=(4, 28)), calibration)
report("pruned 25 %")
recovery = compress.LoRARecovery(lora=compress.LoRA(r=8, alpha=16), steps=args.steps, lr=1e-3, batch_size=8,
                                  seq_len=128)
model = compress.finetune(model, recovery, training_windows(tokenizer, "wikitext2-valid", seq_len=128))  # merged
report("pruned + recovered")
compress.save_model(model, tokenizer, args.output_dir)  # per-layer widths: load with compress.load
print(f"saved {args.output_dir}: compress.load({args.output_dir!r}) loads it")
