"""Quantize, evaluate, and publish: a recipe built in Python (GPTQ W4 g64 on the embedded SmolLM2), run by the same
pipeline as `compress run`, then pushed to the Hugging Face Hub with a model card holding the trade-off table.

    python examples/quantize_then_push.py --repo-id my-org/smollm2-gptq4 --dry-run   # writes the card, sends nothing
    HF_TOKEN=hf_... python examples/quantize_then_push.py --repo-id my-org/smollm2-gptq4
"""

import argparse

import compress

parser = argparse.ArgumentParser()
parser.add_argument("--repo-id", required=True, help="the model repo to create or update, org/name")
parser.add_argument("--samples", type=int, default=128, help="GPTQ calibration windows of 512 tokens")
parser.add_argument("--ppl-tokens", type=int, default=4096, help="WikiText-2 test tokens scored")
parser.add_argument("--output-dir", default="runs/smollm2-gptq4-push")
parser.add_argument("--dry-run", action="store_true", help="stage the upload in OUTPUT_DIR/hub-upload only")
args = parser.parse_args()

recipe = compress.Recipe(
    name="smollm2-gptq4-push",
    model="smollm2-135m",
    steps=[{"quantize": compress.GPTQ(bits=4, group_size=64, calibration={"samples": args.samples})}],
    eval={"tasks": ["wikitext2"], "wikitext2": compress.Perplexity(seq_len=512, max_tokens=args.ppl_tokens)},
    hub={"repo_id": args.repo_id, "private": True},  # the last step, into a private repo
)
report = compress.run(recipe, output_dir=args.output_dir, dry_run=args.dry_run)
for row in report["steps"]:
    print(f"{row['step']}: {row['size_bytes'] / 2**20:.1f} MiB, "
          f"WikiText-2 perplexity {row['wikitext2_perplexity']:.2f}")
where = report['hub']['commit_url'] or report['hub']['staging']
print(f"{'staged' if args.dry_run else 'pushed'} {len(report['hub']['files'])} files: {where}")
