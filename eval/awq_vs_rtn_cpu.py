"""AWQ against round-to-nearest on the whole model, on the CPU in float32 (the GPU run's question on another machine,
dtype, calibration size and search budget): WikiText-2 perplexity (first 8,192 test tokens, 512-token windows) of the
float model, RTN W4 g128 sym, and AWQ W4 g128 sym (clip; 8 x 512 calibration tokens of wikitext2-valid, the search's
block forwards on the first 2,048):

    python eval/awq_vs_rtn_cpu.py QWEN_GGUF > eval/results/awq_vs_rtn_qwen2.5-coder-1.5b_cpu.txt
"""

import copy
import sys
import time

import torch

import compress
from compress.data import calibration_batches

torch.set_num_threads(2)
model, tokenizer = compress.load_model(sys.argv[1], "float32", "cpu")
calibration = calibration_batches(tokenizer, "wikitext2-valid", 8, 512, seed=0)
perplexity = compress.Perplexity(seq_len=512, stride=512, max_tokens=8192)


def score(m, name):
    start = time.time()
    result = compress.evaluate(m, tokenizer, ["wikitext2"], wikitext2=perplexity, show_progress=False)
    print(f"{name:12s} ppl {result['wikitext2']['perplexity']:.4f} ({time.time() - start:.0f} s)", flush=True)


score(model, "float")
for name, config in [("rtn", compress.RTN(bits=4, group_size=128)),
                     ("awq", compress.AWQ(bits=4, group_size=128, search_tokens=2048))]:
    quantized = copy.deepcopy(model)
    start = time.time()
    compress.quantize(quantized, config, calibration, show_progress=False)
    print(f"{name} quantized in {time.time() - start:.0f} s", flush=True)
    score(quantized, name)
    del quantized
