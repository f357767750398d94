"""Quantization-aware training inside your own transformers Trainer, then a checkpoint that stock transformers and
vLLM load: add `compress.QATCallback` to the callbacks; everything else is your usual training code.

    python examples/qat_in_my_trainer.py --steps 300          # ~2 min on a GPU; --steps 4 for a quick look on CPU
"""

import argparse

from transformers import Trainer, TrainingArguments

import compress
from compress.data import training_windows

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--output-dir", default="smollm2-qat-w4g64")
parser.add_argument("--ppl-tokens", type=int, default=4096, help="WikiText-2 test tokens scored")
args = parser.parse_args()

model, tokenizer = compress.load_model("smollm2-135m")  # or any transformers causal LM
windows = training_windows(tokenizer, "wikitext2-valid", seq_len=128)
train_dataset = [{"input_ids": row, "labels": row} for row in windows]

trainer = Trainer(
    model=model,
    args=TrainingArguments(output_dir="qat-scratch", max_steps=args.steps, per_device_train_batch_size=4,
                           learning_rate=1e-4, save_strategy="no", report_to="none"),
    train_dataset=train_dataset,
    callbacks=[compress.QATCallback(compress.QAT(bits=4, group_size=64))],  # fake-quantized W4 g64 while training
)
trainer.train()  # when training ends the callback rounds the weights onto the grid

protocol = compress.Perplexity(seq_len=512, max_tokens=args.ppl_tokens)
print(f"W4 g64 after QAT: WikiText-2 perplexity {compress.perplexity(model, tokenizer, protocol)['perplexity']:.2f}")
compress.save_model(model, tokenizer, args.output_dir)  # compressed-tensors pack-quantized, like PTQ
print(f"saved {args.output_dir}: AutoModelForCausalLM.from_pretrained({args.output_dir!r}) loads it")
