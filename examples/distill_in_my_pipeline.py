"""Knowledge distillation in your own training pipeline: prune a model, then train the pruned student against the
original with `compress.DistillationTrainer` (a transformers Trainer; pass your own TrainingArguments).

    python examples/distill_in_my_pipeline.py --steps 300     # ~1 min on a GPU; --steps 4 for a quick look on CPU
"""

import argparse
import copy

from transformers import TrainingArguments

import compress
from compress.data import calibration_batches, training_windows

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--output-dir", default="smollm2-pruned-distilled")
parser.add_argument("--ppl-tokens", type=int, default=4096, help="WikiText-2 test tokens scored")
args = parser.parse_args()

teacher, tokenizer = compress.load_model("smollm2-135m")
calibration = calibration_batches(tokenizer, "wikitext2-valid", samples=10, seq_len=128)
student = compress.prune(copy.deepcopy(teacher), compress.TaylorPrune(ratio=0.25, layers=(4, 28)), calibration)

windows = training_windows(tokenizer, "wikitext2-valid", seq_len=128)
trainer = compress.DistillationTrainer(
    model=student.train(),
    teacher=teacher,  # runs without gradients; its activations are never kept for backward
    kd=compress.KD(temperature=2.0, alpha=0.7),  # 0.7 x T^2 x KL(teacher || student) + 0.3 x CE
    args=TrainingArguments(output_dir="distill-scratch", max_steps=args.steps, per_device_train_batch_size=4,
                           learning_rate=1e-4, save_strategy="no", report_to="none", remove_unused_columns=False),
    train_dataset=[{"input_ids": row, "labels": row} for row in windows],
)
trainer.train()

protocol = compress.Perplexity(seq_len=512, max_tokens=args.ppl_tokens)
for name, model in (("teacher", teacher), ("pruned + distilled student", student.eval())):
    print(f"{name}: WikiText-2 perplexity {compress.perplexity(model, tokenizer, protocol)['perplexity']:.2f}")
compress.save_model(student, tokenizer, args.output_dir)  # per-layer widths: load with compress.load
