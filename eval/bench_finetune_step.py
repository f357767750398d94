"""Time of one LoRA training step on SmolLM2 (CPU by default): the stock loss path (logits at every position) vs
ours (the output head only where a label exists), with every position labelled and with answer-only labels (the
last 16 tokens of each window, as prompt-masked task data has).

    python eval/bench_finetune_step.py --batch 8 --seq-len 192 --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

import compress
from compress.data import training_windows
from compress.training import labelled_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=192)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = compress.load_model(args.model)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    peft_model.train()
    ids = training_windows(tokenizer, "wikitext2-valid", args.seq_len)[: args.batch]
    answer_only = ids.clone()
    answer_only[:, : -args.answer_tokens] = -100

    def stock(labels):
        return peft_model(input_ids=ids, labels=labels).loss

    def labelled(labels):
        logits, targets, _ = labelled_logits(peft_model, ids, labels)  # LabelledPositionsTrainer's loss
        return torch.nn.functional.cross_entropy(logits.float(), targets)

    for name, loss_fn, labels in [("stock, all labelled", stock, ids), ("ours, all labelled", labelled, ids),
                                  ("stock, answer-only labels", stock, answer_only),
                                  ("ours, answer-only labels", labelled, answer_only)]:
        times = []
        for _ in range(args.steps + 1):
            start = time.perf_counter()
            loss_fn(labels).backward()
            peft_model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        print(f"| {name} | {args.batch} x {args.seq_len} | {statistics.median(times[1:]):.2f} s |", flush=True)


if __name__ == "__main__":
    main()
