"""Round-to-nearest weight-only quantization: each group of input columns gets a scale (and, asymmetric, a zero
point) from its min and max, and every weight is rounded to the nearest grid point. No calibration data. On an FP4
grid (compress.quantize.fp4) the grid points are e2m1 values, and NVFP4's global scale is taken first, shared by the
Linears that read one input."""

from __future__ import annotations

import torch
from rich.progress import track

from compress.config.quantize import RTN, WeightOnlyConfig
from compress.modules import require_float
from compress.moe import unfuse_experts
from compress.quantize.fp4 import check_fp4_widths, enable_fp4_activations, global_scale, same_input_groups
from compress.quantize.fp4 import input_args as fp4_input_args
from compress.quantize.grid import (
    QUANT_ATTR,
    WeightQuant,
    check_group_size,
    fake_quantize,
    minmax_qparams,
    quantizable_linears,
)
from compress.quantize.head_embed import prepare, round_head
from compress.quantize.mixed import linear_grids


@torch.no_grad()
def quantize_rtn(model: torch.nn.Module, config: RTN | WeightOnlyConfig, *, show_progress: bool = True
                 ) -> torch.nn.Module:
    """Round every decoder Linear (and, where asked, the head and the embeddings) onto the grid in place; the grid is
    recorded on the module for saving."""
    require_float(model, "quantize", "its weights already lie on a quantization grid")
    unfuse_experts(model)  # MoE: one Linear per expert projection (compress.moe)
    check_fp4_widths(model, config)
    check_group_size(model, config.group_size)
    grids = linear_grids(model, config)  # overrides: a grid per Linear
    prepare(model, config)  # asked for: a tied head untied, the embeddings rounded
    round_head(model, config)
    fp4 = getattr(config, "grid", "int") != "int"
    inputs = fp4_input_args(config.grid) if fp4 and config.activations == "dynamic" else None
    linears = dict(quantizable_linears(model, keep_float=config.ignore))
    shared = {name: global_scale([linears[n].weight for n in group], grids[group[0]])
              for group in (same_input_groups(model, list(linears)) if fp4 else []) for name in group}
    for name, linear in track(list(linears.items()), description="RTN rounding", disable=not show_progress,
                              transient=True):
        args = grids[name]
        scale, zero_point = minmax_qparams(linear.weight, args, shared.get(name))
        linear.weight.copy_(fake_quantize(linear.weight, scale, zero_point, args, shared.get(name)))
        setattr(linear, QUANT_ATTR, WeightQuant(args, scale, zero_point, inputs, global_scale=shared.get(name)))
        if inputs is not None:  # MXFP4 W4A4: the input scales are powers of two from each group, at run time
            enable_fp4_activations(linear)
    return model
