"""AWQ against round-to-nearest on the whole model, on the CPU in float32 (the GPU run's question on another machine,
dtype, calibration size and search budget): WikiText-2 perplexity (first 8,192 test tokens, 512-token windows) of the
float model, RTN W4 g128 sym, and AWQ W4 g128 sym (clip; 8 x 512 calibration tokens of wikitext2-valid, the search's
block forwards on the first 2,048):

    python eval/awq_vs_rtn_cpu.py QWEN_GGUF > eval/results/awq_vs_rtn_qwen2.5-coder-1.5b_cpu.txt

`--rows awq --awq-options '{"first_token_weight": 511}'` scores one AWQ variant alone (same calibration and test
tokens as the rows of a run without it)."""

import argparse
import copy
import json
import time

import torch

import compress
from compress.data import calibration_batches

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("model")
parser.add_argument("--rows", default="float,rtn,awq", help="which of float, rtn, awq to score")
parser.add_argument("--awq-options", default="{}", help="AWQ settings as JSON")
args = parser.parse_args()
rows = args.rows.split(",")
torch.set_num_threads(2)
model, tokenizer = compress.load_model(args.model, "float32", "cpu")
calibration = calibration_batches(tokenizer, "wikitext2-valid", 8, 512, seed=0)
perplexity = compress.Perplexity(seq_len=512, stride=512, max_tokens=8192)


def score(m, name):
    start = time.time()
    result = compress.evaluate(m, tokenizer, ["wikitext2"], wikitext2=perplexity, show_progress=False)
    print(f"{name:12s} ppl {result['wikitext2']['perplexity']:.4f} ({time.time() - start:.0f} s)", flush=True)


if "float" in rows:
    score(model, "float")
awq = compress.AWQ(bits=4, group_size=128, search_tokens=2048, **json.loads(args.awq_options))
for name, config in [("rtn", compress.RTN(bits=4, group_size=128)), ("awq", awq)]:
    if name not in rows:
        continue
    quantized = copy.deepcopy(model)
    start = time.time()
    compress.quantize(quantized, config, calibration, show_progress=False)
    print(f"{name} ({config.describe()}) quantized in {time.time() - start:.0f} s", flush=True)
    score(quantized, name)
    del quantized
