"""The llm-compressor side of bench_gptq.py, bench_recovery.py, bench_fp4.py and smoothquant_quality.py: the same
model, calibration token ids and grid through llm-compressor's `oneshot` + `GPTQModifier` (or, `--method awq`, its
`AWQModifier` then round-to-nearest; `--method smoothquant`, its `SmoothQuantModifier` then its W8A8 preset by
round-to-nearest: int8 weights per channel, int8 inputs per token at run time).
Runs in llm-compressor's own virtualenv (it pins transformers <= 5.17 and compressed-tensors 0.19, so it is never a
dependency of compress); prints one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import LLAMA2_7B, random_llama, timed  # noqa: E402


def _word_level_tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))


def save_weights(model, path: str) -> None:
    """Every tensor (AWQ also rescales the norms), each quantized Linear's weight as its grid holds it."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from safetensors.torch import save_file

    weights = {name: tensor.detach().float().cpu().clone() for name, tensor in model.state_dict().items()
               if not name.rsplit(".", 1)[-1].startswith(("weight_", "input_", "output_"))}
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if isinstance(module, torch.nn.Linear) and scheme is not None and hasattr(module, "weight_scale"):
                zero = getattr(module, "weight_zero_point", None)
                weights[name + ".weight"] = fake_quantize(
                    module.weight, module.weight_scale, zero, scheme.weights,
                    global_scale=getattr(module, "weight_global_scale", None)).float().cpu().contiguous()
    save_file(weights, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="llama2-7b-shape, or a folder/GGUF path")
    parser.add_argument("--gguf-file")
    parser.add_argument("--random", action="store_true", help="--model is a folder with only a config.json: random "
                                                              "weights of that shape (MoE experts are linearized "
                                                              "and all calibrated by oneshot itself)")
    parser.add_argument("--ids", required=True, help="calibration token ids saved with torch.save")
    parser.add_argument("--method", choices=["gptq", "awq", "smoothquant"], default="gptq")
    parser.add_argument("--alpha", type=float, default=0.5, help="smoothquant: the migration strength")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--scheme", help="a preset scheme (e.g. NVFP4A16) in place of --bits / --group-size")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--save-weights", help="write the quantized Linear weights here (safetensors)")
    args = parser.parse_args()

    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    dtype = getattr(torch, args.dtype)
    if args.model == "llama2-7b-shape":
        model = random_llama(LLAMA2_7B, dtype, args.device)
        processor = PreTrainedTokenizerFast(tokenizer_object=_word_level_tokenizer())  # unused: ids are given
        # oneshot re-reads the config from model.name_or_path to check the model is not already quantized
        folder = tempfile.mkdtemp(prefix="peer-config-")
        model.config.save_pretrained(folder)
        model.config.name_or_path = folder
    elif args.random:
        from transformers import AutoConfig

        torch.manual_seed(0)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), dtype=dtype).eval()
        model.config.name_or_path = args.model
        processor = PreTrainedTokenizerFast(tokenizer_object=_word_level_tokenizer())
    else:
        from transformers import AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, gguf_file=args.gguf_file, dtype=dtype)
        model = model.to(args.device).eval()
        processor = AutoTokenizer.from_pretrained(args.model, gguf_file=args.gguf_file)
    ids = torch.load(args.ids)
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    loader = torch.utils.data.DataLoader(rows, batch_size=1)  # llm-compressor's default calibration batch
    grid = {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": args.bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": args.group_size}}}
    if args.method == "gptq" and args.scheme:
        recipe = GPTQModifier(targets="Linear", ignore=["lm_head"], block_size=128, dampening_frac=0.01,
                              actorder="static", scheme=args.scheme)
    elif args.method == "gptq":
        recipe = GPTQModifier(targets="Linear", ignore=["lm_head"], block_size=128, dampening_frac=0.01,
                              actorder="static", config_groups=grid)
    elif args.method == "smoothquant":  # its default mappings: the norms into q/k/v and into gate/up
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        recipe = [SmoothQuantModifier(smoothing_strength=args.alpha),
                  QuantizationModifier(targets="Linear", ignore=["lm_head"], scheme="W8A8")]
    else:  # AWQ (duo scaling, 20 grid points: its defaults) then the same grid by round-to-nearest
        if args.device == "cpu":  # its AWQ pins cached activations for faster GPU uploads, which fails without one
            from llmcompressor.pipelines.cache import IntermediatesCache

            IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        recipe = [AWQModifier(duo_scaling=True, n_grid=20),
                  QuantizationModifier(targets="Linear", ignore=["lm_head"], config_groups=grid)]
    _, seconds, peak = timed(lambda: oneshot(model=model, dataset=loader, recipe=recipe, processor=processor,
                                             num_calibration_samples=len(ids), max_seq_length=ids.shape[1]))
    if args.save_weights:
        save_weights(model, args.save_weights)
    import llmcompressor

    print(json.dumps({"tool": f"llm-compressor {llmcompressor.__version__} {args.method}", "seconds": seconds,
                      "peak_cuda_bytes": peak}))


if __name__ == "__main__":
    main()
