"""WikiText-2 perplexity of SmolLM2-135M (embedded GGUF) before and after RTN at several settings.

    python eval/rtn_quality.py --max-tokens 65536            # about 2.5 min per setting on 2 CPU cores
    python eval/rtn_quality.py --max-tokens 0                # the whole test set (~300k tokens)
"""

from __future__ import annotations

import argparse
import copy

import compress

SETTINGS = [
    compress.RTN(bits=8, group_size=-1),
    compress.RTN(bits=4, group_size=64),
    compress.RTN(bits=4, group_size=64, sym=False),
    compress.RTN(bits=4, group_size=32),
    compress.RTN(bits=3, group_size=64),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=65536, help="0 = the whole test set")
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    protocol = compress.Perplexity(seq_len=args.seq_len, max_tokens=args.max_tokens or None, batch_size=4)
    model, tokenizer = compress.load_model(args.model)

    def score(m):
        result = compress.perplexity(m, tokenizer, protocol)
        return result["perplexity"], result["protocol"]["tokens_scored"], result["seconds"]

    base, tokens, seconds = score(model)
    print("| setting | WikiText-2 ppl | vs base | eval s |\n|---|---:|---:|---:|")
    print(f"| base (GGUF Q4_1 dequantized, fp32) | {base:.3f} | 1.000x | {seconds:.0f} |", flush=True)
    for config in SETTINGS:
        quantized = compress.quantize(copy.deepcopy(model), config, show_progress=False)
        ppl, _, seconds = score(quantized)
        print(f"| {config.describe()} | {ppl:.3f} | {ppl / base:.3f}x | {seconds:.0f} |", flush=True)
        del quantized
    print(f"\nprotocol: wikitext2-test, seq_len {args.seq_len}, stride {args.seq_len}, {tokens:,} tokens scored")


if __name__ == "__main__":
    main()
