"""GPTQ: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (ICLR 2023).

For a Linear with weight W [rows, cols] and calibration inputs X, GPTQ minimises ||W X - Q X||² one column at a
time: quantize column j, then spread its rounding error over the columns not yet quantized through the inverse of
the Hessian H = 2 X Xᵀ (the Optimal Brain Quantizer update). The paper's three steps that make it fast:
  1. any fixed column order serves every row, so rows are solved together (act-order: largest H_jj first);
  2. lazy batch updates: a block of columns is solved, then its errors reach the rest of W in one matmul;
  3. the Cholesky factor of H⁻¹ replaces the per-column inverse updates (and is numerically stable).
Decoder layers are calibrated in sequence on the outputs of the already-quantized layers (layerwise.py).

Under several processes (compress.distributed) each rank runs its share of the calibration samples through the
layers; the Hessians' sums are all-reduced, so every rank holds the Hessian of the whole set. Rows of a weight are
quantized independently given H, so each rank solves its share of the rows and the quantized rows are gathered:
every solve is split, including those of "true sequential" order, where the groups of one layer must wait for each
other (an owner rank per group, as llm-compressor does, would leave the other ranks idle there).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from functools import partial
from typing import NamedTuple

import torch
from rich.progress import Progress

from compress import distributed
from compress.config.quantize import GPTQ
from compress.errors import CompressError
from compress.modules import available_memory, kept_float, require_float
from compress.moe import calibrating_all_experts, unfuse_experts
from compress.quantize import kernels
from compress.quantize.fp4 import (
    E2M1_MAX,
    check_fp4_widths,
    enable_fp4_activations,
    global_scale,
    is_fp4,
    observing_input_maxima,
    round_e2m1_,
    set_input_global_scales,
)
from compress.quantize.fp4 import input_args as fp4_input_args
from compress.quantize.grid import (
    QUANT_ATTR,
    WeightQuant,
    check_group_size,
    error_ratio,
    fake_quantize,
    minmax_qparams,
    output_energy_per_row,
    quantizable_linears,
    quantization_args,
)
from compress.quantize.head_embed import head_args, prepare
from compress.quantize.layerwise import LayerwiseCalibration
from compress.quantize.mixed import linear_grids, loss_probe

MAX_DAMP_RETRIES = 3  # dampening is raised tenfold per retry
# on the model after quantize_gptq: {Linear name: the damp its solve used}, for every Linear whose Hessian needed more
# than the configured damp (the pipeline records it in step.json; `raised_damping`)
RAISED_DAMP_ATTR = "gptq_raised_damp"
DEFAULT_BATCH_TOKENS = 16384


# ---------------------------------------------------------------- the Hessians of one decoder layer


class _SeenAllInputs(Exception):
    """Raised once every Linear of the layer has seen its input: the rest of the layer is not needed."""


class LayerHessians:
    """H = 2/n Σ x xᵀ for the input x of every Linear in one decoder layer. Linears that read the same tensor
    (q/k/v read one normed hidden state, gate/up another) share one Hessian: it is accumulated once."""

    def __init__(self, linears: dict[str, torch.nn.Linear]):
        self.linears = linears
        self.groups: list[list[str]] | None = None  # names sharing an input, found on the first batch
        self.sums: list[torch.Tensor] = []
        self.tokens = 0
        self._inputs: dict[str, torch.Tensor] = {}

    def _hook(self, name: str):
        def record(module, args):
            self._inputs[name] = args[0]
            if len(self._inputs) == len(self.linears):
                self._add_batch()
                raise _SeenAllInputs  # the last Linear's own matmul and everything after it are skipped

        return record

    def _add_batch(self) -> None:
        if self.groups is None:
            by_tensor: dict[int, list[str]] = {}
            for name, x in self._inputs.items():
                by_tensor.setdefault(x.data_ptr(), []).append(name)
            self.groups = list(by_tensor.values())
            self.sums = [torch.zeros(self.linears[g[0]].in_features, self.linears[g[0]].in_features,
                                     device=self._inputs[g[0]].device) for g in self.groups]
        for group, total in zip(self.groups, self.sums):
            x = self._inputs[group[0]]
            x = x.reshape(-1, x.shape[-1])
            add_gram(total, x)
        self.tokens += x.shape[0]
        self._inputs.clear()

    def _run(self, calibration: LayerwiseCalibration, layer: torch.nn.Module, samples: int | None = None) -> None:
        handles = [linear.register_forward_pre_hook(self._hook(name)) for name, linear in self.linears.items()]
        try:
            calibration.run(layer, stop=_SeenAllInputs, samples=samples)
        finally:
            for handle in handles:
                handle.remove()

    def probe(self, calibration: LayerwiseCalibration, layer: torch.nn.Module) -> list[list[str]]:
        """Which Linears share an input, from one sample (cheap): names in the order the layer calls them."""
        self._run(calibration, layer, samples=1)
        return self.groups

    def collect(self, calibration: LayerwiseCalibration, layer: torch.nn.Module
                ) -> list[tuple[list[str], torch.Tensor]]:
        self._run(calibration, layer)
        tokens = distributed.all_sum(self.tokens)
        return [(group, distributed.all_sum_(total).mul_(2 / tokens)) for group, total in zip(self.groups, self.sums)]


GRAM_BLOCK = 512  # CPU: xᵀx is symmetric, so only the blocks on and above the diagonal are multiplied


def add_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """total += xᵀx in float32. On CUDA, half-precision inputs go to the tensor cores with a float32 result
    (products of bfloat16/float16 values are exact in float32, so nothing is lost against casting first). On the
    CPU, where these products are a third of a GPTQ run, wide inputs skip the blocks below the diagonal (for
    SmolLM2's 1536-wide MLP input: 6 of 9 blocks)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        try:
            total.add_(torch.mm(x.T, x, out_dtype=torch.float32))
            return
        except TypeError:  # torch before mm(out_dtype=): the float32 product below
            pass
    x = x.float()
    width = x.shape[1]
    if x.is_cuda or width < 2 * GRAM_BLOCK:
        total.addmm_(x.T, x)
        return
    for i in range(0, width, GRAM_BLOCK):
        rows = slice(i, i + GRAM_BLOCK)
        block = x[:, rows].T @ x[:, i:]  # this block row, from the diagonal rightwards
        total[rows, i:] += block
        total[i + GRAM_BLOCK:, rows] += block[:, GRAM_BLOCK:].T


# ---------------------------------------------------------------- the solver


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, where: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = damp · mean(diag H) (paper §4, "Cholesky reformulation"), and the
    damp used. If H + λI is not positive definite, λ is raised tenfold and retried, then the error names the layer.

    With J the reversal permutation and J(H + λI)J = L Lᵀ, (H + λI)⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J) and J L⁻¹ J is upper
    triangular with a positive diagonal: it is U (the factor is unique). One factorisation and one triangular solve,
    in place of the reference's factorisation, inverse and second factorisation: every process repeats them, so they
    bound what several processes gain (eval/bench_distributed.py measures it)."""
    mean_diag = hessian.diagonal().mean()
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        used = damp * 10**attempt
        factor, info = torch.linalg.cholesky_ex((hessian + used * mean_diag * eye).flip(0, 1))
        if info == 0:
            upper = torch.linalg.solve_triangular(factor, eye, upper=False).flip(0, 1)
            if torch.isfinite(upper).all():
                return upper, used
    raise CompressError(f"quantize (GPTQ), {where}: the Hessian is not positive definite even with damp "
                        f"{damp * 10**MAX_DAMP_RETRIES:g} (the inputs are degenerate); use more calibration samples "
                        f"or a larger damp")


def quantize_block(block: torch.Tensor, upper: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   qmin: float, qmax: float, fp4: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a block of columns one at a time (paper, Algorithm 1, inner loop); `block` [rows, b] is scratch.
    Returns the quantized columns and the scaled errors that the caller applies to later columns. `fp4`: the grid
    points are e2m1 values (compress.quantize.fp4) instead of integers.

    Each column is a few elementwise operations on a vector of `rows` values, b times in sequence, so the loop's cost
    is per-operation overhead, not arithmetic. It therefore works on the transposed block (every column one
    contiguous row, updated in place with out= operations), skips the zero point where the grid has none (q + 0 and
    q - 0 are q), and on the CPU runs on one thread: with more, every small operation pays a parallel region's
    synchronisation (eval/bench_gptq_solve.py). The values are those of the column-by-column formula."""
    with _one_cpu_thread(block):
        work = block.T.contiguous()  # [b, rows]
        scale_t, zero_t = scale.T.contiguous(), zero.T.contiguous()
        has_zero = bool(zero_t.any())
        quantized, errors = torch.empty_like(work), torch.empty_like(work)
        diagonal = upper.diagonal().tolist()
        for i in range(work.shape[0]):
            w, q, error = work[i], quantized[i], errors[i]
            torch.div(w, scale_t[i], out=q)
            if fp4:
                round_e2m1_(q)
            else:
                q.round_()
            if has_zero:
                q.add_(zero_t[i])
            q.clamp_(qmin, qmax)
            if has_zero:
                q.sub_(zero_t[i])
            q.mul_(scale_t[i])
            torch.sub(w, q, out=error)
            error.div_(diagonal[i])
            work[i + 1:].addr_(upper[i, i + 1:], error, alpha=-1)  # OBQ update of the block's remaining columns
        return quantized.T, errors.T


@contextmanager
def _one_cpu_thread(tensor: torch.Tensor):
    """torch on one thread while a CPU tensor's column loop runs (the thread count is restored after)."""
    if tensor.device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class HessianFactor(NamedTuple):
    """What every row of a solve shares, computed once per Hessian: the dead columns, the column order, U, and the
    damp U was computed with (the configured one, or more where H needed it)."""
    dead: torch.Tensor
    order: torch.Tensor
    upper: torch.Tensor
    damp: float


def check_finite_hessian(hessian: torch.Tensor, where: str) -> None:
    """Stop, naming the layer, when calibration inputs were NaN or inf: no damping makes such a Hessian usable, and
    the quantized weights would be NaN. Called on the all-reduced Hessian, which every rank holds alike, so every
    rank stops here together (a check of one rank's own sum could leave the others waiting in the all-reduce)."""
    bad = ~torch.isfinite(hessian)
    if bad.any():
        raise CompressError(f"quantize (GPTQ), {where}: the Hessian of the calibration inputs has {int(bad.sum())} "
                            f"NaN or inf entries: the model before this step computes non-finite values on the "
                            f"calibration data (check its weights for NaN/inf; in float16, try dtype bfloat16)")


def hessian_factor(hessian: torch.Tensor, act_order: bool, damp: float, where: str) -> HessianFactor:
    check_finite_hessian(hessian, where)
    H = hessian.clone()
    # columns no calibration token ever reached: any value is exact, so quantize them as zeros (in gptq_solve)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    order = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(len(H), device=H.device)
    return HessianFactor(dead, order, *inverse_hessian_factor(H[order][:, order], damp, where))


def gptq_solve(weight: torch.Tensor, hessian: torch.Tensor, args, act_order: bool, damp: float,
               block_size: int, where: str, factor: HessianFactor | None = None,
               global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `weight` [rows, cols] against `hessian` [cols, cols]; returns (quantized weight, scale, zero point)
    on compressed-tensors' grid. Rows are independent given the Hessian: any set of rows that share it (several
    Linears, a slice of one) can be solved together or apart with the same `factor`. On NVFP4, `global_scale` is
    the tensor's (fixed before the sweep, from the float weights), and the scales are stored multiplied by it."""
    dead, order, U, _ = factor or hessian_factor(hessian, act_order, damp, where)
    W = weight.float().clone()
    W[:, dead] = 0
    cols = W.shape[1]

    group = cols if args.group_size is None else args.group_size
    # Scales are fixed before the sweep when the column order is permuted ("static groups": a group's columns
    # are scattered through the order, and the saved format keeps groups contiguous), or per channel; otherwise
    # each group's scale is taken from its already-updated columns when the sweep reaches it (paper, §4).
    static = act_order or args.group_size is None
    scale, zero = minmax_qparams(W, args, global_scale) if static else (None, None)
    W = W[:, order]
    group_of_column = order // group
    block_size = block_size if static else group  # a group's scale is known when its block starts
    group_scales, group_zeros = [], []

    fp4 = is_fp4(args)
    qmin, qmax = -(2 ** (args.num_bits - 1)), 2 ** (args.num_bits - 1) - 1  # compressed-tensors' signed grid
    if fp4:
        qmin, qmax = -E2M1_MAX, E2M1_MAX
    steps = 1 if global_scale is None else global_scale.float()  # the grid's step is scale / global scale
    Q = torch.empty_like(W)
    solve_block = kernels.quantize_block if kernels.available(W) and not fp4 else partial(quantize_block, fp4=fp4)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = W[:, start:end]
        if static:
            columns = group_of_column[start:end]
            block_scale, block_zero = scale[:, columns], zero[:, columns]
        else:
            block_scale, block_zero = minmax_qparams(block, args, global_scale)  # [rows, 1]: this block is a group
            group_scales.append(block_scale)
            group_zeros.append(block_zero)
        Q[:, start:end], errors = solve_block(block, U[start:end, start:end],
                                                 (block_scale.float() / steps).expand_as(block),
                                                 block_zero.float().expand_as(block), qmin, qmax)
        W[:, end:].addmm_(errors, U[start:end, end:], alpha=-1)  # lazy batch update of all later columns
    if not static:
        scale, zero = torch.cat(group_scales, dim=1), torch.cat(group_zeros, dim=1)

    Q = Q[:, torch.argsort(order)]
    # round-trip through compressed-tensors' own fake-quantize so memory matches what loaders decompress
    return fake_quantize(Q, scale, zero, args, global_scale), scale, zero


# ---------------------------------------------------------------- the verb


def _calibration_device(model: torch.nn.Module, offload: bool) -> torch.device:
    home = next(model.parameters()).device
    return torch.device("cuda") if offload and torch.cuda.is_available() else home


def _whole_set_fits(model: torch.nn.Module, input_ids: torch.Tensor, device: torch.device) -> bool:
    """Whether one forward of the whole calibration set through one decoder layer fits in memory, with room: the
    widest Linear output, a few times over (an MLP holds gate, up and their product at once)."""
    widest = max(linear.out_features for _, linear in quantizable_linears(model.get_decoder()))
    element = next(model.parameters()).element_size()
    return input_ids.numel() * widest * element * 6 < 0.5 * available_memory(device)


SOLVE_SLICE = 2**27  # weight elements per solve: ~0.5 GiB of float32 rows, a few copies of it at a time


def _stacked_rows(weights: list[torch.Tensor], begin: int, end: int) -> torch.Tensor:
    """Rows [begin, end) of the weights stacked one above the other, without stacking them all."""
    pieces, offset = [], 0
    for weight in weights:
        low, high = max(begin, offset), min(end, offset + len(weight))
        if low < high:
            pieces.append(weight[low - offset:high - offset])
        offset += len(weight)
    return torch.cat(pieces) if pieces else weights[0][:0]


def _solve_group(linears: dict, names: list[str], hessian: torch.Tensor, grids, config: GPTQ, where: str) -> None:
    """GPTQ for all Linears sharing `hessian` (`grids`: each one's grid, or one for all): one factorisation, and the
    rows of those on one grid stacked into one column sweep (rows are independent given the Hessian, so Linears on
    different grids are solved apart with the same factor; compress.quantize.mixed keeps siblings on one grid for
    serving). The sweep's per-column kernel launches are paid once for the stack, not once per Linear. The stack is
    solved in slices of at most SOLVE_SLICE elements, which bounds the solver's
    memory whatever the group (an MoE layer's gate/up group is 16 Linears, 229,376 rows at Mixtral-8x7B). Under
    several processes each solves its share of the stack's rows and all gather them. Weights replaced in place; a
    damp raised above the configured one is warned about and noted on each Linear (RAISED_DAMP_ATTR)."""
    factor = hessian_factor(hessian, config.act_order, config.damp, where)
    if factor.damp != config.damp:
        if distributed.is_main():  # every rank factorises the same Hessian: one warning
            warnings.warn(f"GPTQ {where}: the Hessian is not positive definite with damp {config.damp:g}; it was "
                          f"quantized with damp {factor.damp:g} (recorded with the step). More calibration samples "
                          f"usually avoid this", stacklevel=2)
        for name in names:
            setattr(linears[name], RAISED_DAMP_ATTR, factor.damp)
    grids = grids if isinstance(grids, dict) else dict.fromkeys(names, grids)
    for args in {grids[name].model_dump_json(): grids[name] for name in names}.values():
        _solve_rows(linears, [name for name in names if grids[name] == args], hessian, args, config, where, factor)


def _solve_rows(linears: dict, names: list[str], hessian: torch.Tensor, args, config: GPTQ, where: str,
                factor: HessianFactor) -> None:
    weights = [linears[name].weight for name in names]
    shared = global_scale(weights, args) if is_fp4(args) else None  # NVFP4: one per group that reads one input
    total, cols = sum(len(w) for w in weights), weights[0].shape[1]
    mine = distributed.share(range(total))
    quantized = weights[0].new_empty(len(mine), cols)
    step = max(1, SOLVE_SLICE // cols)
    scale, zero, changed, kept = [], [], [], []
    # at least one (perhaps empty) slice: a process whose share is empty still sends its part to the gather
    for begin in range(mine.start, mine.stop, step) or [mine.start]:
        end = min(begin + step, mine.stop)
        rows = _stacked_rows(weights, begin, end)
        solved, slice_scale, slice_zero = gptq_solve(rows, hessian, args, config.act_order, config.damp,
                                                     config.block_size, where, factor, shared)
        slice_changed, slice_kept = output_energy_per_row(rows, solved, hessian)  # for each Linear's sensitivity
        quantized[begin - mine.start:end - mine.start] = solved
        for done, part in zip((scale, zero, changed, kept), (slice_scale, slice_zero, slice_changed, slice_kept)):
            done.append(part)
    quantized, scale, zero, changed, kept = (distributed.gather_rows(part, total) for part in
                                             (quantized, *(torch.cat(done) for done in (scale, zero, changed, kept))))
    row = 0
    for name in names:
        linear = linears[name]
        rows = slice(row, row + linear.out_features)
        linear.weight.copy_(quantized[rows])
        setattr(linear, QUANT_ATTR, WeightQuant(args, scale[rows], zero[rows], fp4_inputs(config),
                                                output_error=error_ratio(changed[rows], kept[rows]),
                                                global_scale=shared))
        row += linear.out_features


def _quantize_layer_two_passes(calibration: LayerwiseCalibration, layer, index: int, linears: dict, args,
                               config: GPTQ, last: bool) -> None:
    """schedule two_pass: one pass over the chunks collects every Hessian (float weights), the layer is quantized,
    and a second pass computes its outputs with the quantized weights for the next layer."""
    for names, hessian in LayerHessians(linears).collect(calibration, layer):
        _solve_group(linears, names, hessian, args, config, f"layer {index} ({', '.join(names)})")
    if not last:  # the last layer's outputs feed nothing
        calibration.propagate(layer, index)


def _group_hessian(calibration: LayerwiseCalibration, layer, first: torch.nn.Linear) -> torch.Tensor:
    """The Hessian of `first`'s input over every calibration chunk; the layer stops where `first` is reached."""
    state: dict = {}

    def record(module, inputs):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        if "sum" not in state:
            state.update(sum=torch.zeros(x.shape[1], x.shape[1], device=x.device), tokens=0)
        add_gram(state["sum"], x)
        state["tokens"] += x.shape[0]
        raise _SeenAllInputs

    handle = first.register_forward_pre_hook(record)
    try:
        calibration.run(layer, stop=_SeenAllInputs)
    finally:
        handle.remove()
    return distributed.all_sum_(state["sum"]).mul_(2 / distributed.all_sum(state["tokens"]))


def _quantize_layer_sequential(calibration: LayerwiseCalibration, layer, index: int, linears: dict, args,
                               config: GPTQ, last: bool) -> None:
    """schedule sequential: the groups of Linears that share an input (q/k/v, o, gate/up, down) are solved in the
    order the layer calls them, each on inputs computed with the groups before it already quantized (the GPTQ
    reference's "true sequential"). With the whole calibration set in one chunk, one forward does it all: each group
    is solved the moment its input arrives, and the same forward yields the next layer's input. With several
    chunks, each group's Hessian takes one partial pass over them. Same algorithm either way: only the order in
    which the Hessians' sums are added differs."""
    where = lambda names: f"layer {index} ({', '.join(names)})"  # noqa: E731
    groups = LayerHessians(linears).probe(calibration, layer)
    if not distributed.all_true(len(calibration.hidden) == 1):
        for names in groups:
            _solve_group(linears, names, _group_hessian(calibration, layer, linears[names[0]]), args, config,
                         where(names))
        if not last:
            calibration.propagate(layer, index)
        return

    def solve_on_arrival(names: list[str]):
        def hook(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            hessian = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            add_gram(hessian, x)
            hessian = distributed.all_sum_(hessian).mul_(2 / distributed.all_sum(x.shape[0]))
            _solve_group(linears, names, hessian, args, config, where(names))

        return hook

    # the first Linear of each shared-input group solves the whole group before any of them computes
    handles = [linears[names[0]].register_forward_pre_hook(solve_on_arrival(names)) for names in groups]
    try:
        calibration.propagate(layer, index)
    finally:
        for handle in handles:
            handle.remove()


def _quantize_head(model: torch.nn.Module, layerwise: LayerwiseCalibration, config: GPTQ) -> None:
    """The head, solved like a decoder Linear against the Hessian of its input: the final norm's output over the last
    decoder layer's (quantized) outputs. With offload, the norm and the head visit the calibration device."""
    head, norm = model.get_output_embeddings(), model.get_decoder().norm
    with layerwise.on_device([norm, head]):
        total, tokens = None, 0
        for hidden in layerwise.hidden:
            x = norm(hidden)
            x = x.reshape(-1, x.shape[-1])
            if total is None:
                total = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            add_gram(total, x)
            tokens += x.shape[0]
        hessian = distributed.all_sum_(total).mul_(2 / distributed.all_sum(tokens))
        _solve_group({"lm_head": head}, ["lm_head"], hessian, head_args(config, "weight" if config.act_order else None),
                     config, "lm_head")
    quant = getattr(head, QUANT_ATTR)
    if config.offload:  # the grid follows the weight back to the CPU
        setattr(head, QUANT_ATTR, replace(quant, scale=quant.scale.cpu(), zero_point=quant.zero_point.cpu()))


def fp4_inputs(config: GPTQ):
    """The input args of W4A4 on an FP4 grid, else None."""
    return fp4_input_args(config.grid) if config.grid != "int" and config.activations == "dynamic" else None


def calibration_share(calibration: torch.Tensor) -> torch.Tensor:
    """This process's calibration samples (all of them in one process)."""
    if len(calibration) < distributed.world_size():
        raise CompressError(f"{len(calibration)} calibration samples for {distributed.world_size()} processes: each "
                            f"process needs at least one; raise calibration.samples or launch fewer processes")
    return distributed.share(calibration)


def resolve_run(model: torch.nn.Module, config: GPTQ, calibration: torch.Tensor, **_) -> GPTQ:
    """The config as it will run: `batch_tokens` decided by memory now (the whole set in one forward when it fits on
    the calibration device, unless offloading; else 16,384-token chunks). It changes only the order in which the
    Hessians' sums are added, so it is recorded with the step, not fingerprinted."""
    if config.batch_tokens is not None:
        return config
    fits = not config.offload and _whole_set_fits(model, calibration, _calibration_device(model, config.offload))
    fits = distributed.all_true(fits)  # every process chunks alike
    return config.model_copy(update={"batch_tokens": calibration.numel() if fits else DEFAULT_BATCH_TOKENS})


@torch.no_grad()
def probe_errors(model: torch.nn.Module, config, calibration: torch.Tensor, names: set[str]
                 ) -> dict[str, tuple[float, float]]:
    """{Linear: (||(Q − W) X||², ||W X||²)} for the Linears in `names`, Q their round-to-nearest onto the step's grid
    and X their calibration inputs through the float model, from GPTQ's layer-by-layer Hessians (one pass for the
    Hessians, one for the next layer's inputs): the sensitivity probe of a mixed-precision budget
    (compress.quantize.mixed)."""
    args = quantization_args(config)
    device = _calibration_device(model, config.offload)
    batch_tokens = resolve_run(model, config, calibration).batch_tokens
    layerwise = LayerwiseCalibration(model, calibration_share(calibration), device, batch_tokens)
    full = {id(module): name for name, module in model.named_modules()}
    energies = {}
    for index, layer in enumerate(layerwise.layers):
        with layerwise.layer_on_device(index) if config.offload else nullcontext():
            linears = {local: m for local, m in quantizable_linears(layer) if full[id(m)] in names}
            for group, hessian in LayerHessians(linears).collect(layerwise, layer) if linears else ():
                for local in group:
                    weight = linears[local].weight
                    rounded = fake_quantize(weight, *minmax_qparams(weight, args), args)
                    changed, kept = output_energy_per_row(weight, rounded, hessian)
                    energies[full[id(linears[local])]] = (changed.sum().item(), kept.sum().item())
            if index + 1 < len(layerwise.layers):
                layerwise.propagate(layer, index)
    return energies


@torch.no_grad()
def quantize_gptq(model: torch.nn.Module, config: GPTQ, calibration: torch.Tensor, *,
                  show_progress: bool = True) -> torch.nn.Module:
    """Quantize every decoder Linear with GPTQ, layer by layer, on `calibration` token ids [samples, seq_len]; where
    asked, the embeddings first (to nearest) and the head last (compress.quantize.head_embed).

    `offload` changes where the weights wait (the CPU, one decoder layer at a time on the GPU) and, by default, chunks
    the calibration forwards; `batch_tokens` (`resolve_run`) changes only how those forwards are chunked, so only the
    order of additions. `schedule` is the one setting that changes the algorithm."""
    require_float(model, "quantize", "its weights already lie on a quantization grid")
    unfuse_experts(model)  # MoE: one Linear per expert projection, each calibrated on every token (compress.moe)
    check_fp4_widths(model, config)
    check_group_size(model, config.group_size)
    # every Linear's grid, decided before any solve (compress.quantize.mixed); the budget's probe runs here
    # (the loss probe reads the same first sequences on every process, so all rank alike)
    by_loss = config.keep is not None and config.keep.rank == "loss"
    probe = (partial(loss_probe, model, config, calibration[:config.keep.probe_samples]) if by_loss
             else partial(probe_errors, model, config, calibration))
    grids = linear_grids(model, config, probe,
                         "weight" if config.act_order else None)
    prepare(model, config)  # asked for: a tied head untied, the embeddings rounded (the layers calibrate on them)
    names = {id(module): name for name, module in model.named_modules()}
    observed_inputs = fp4_inputs(config) is not None  # W4A4: the inputs' ranges, for their global scales
    home = next(model.parameters()).device
    device = _calibration_device(model, config.offload)
    if config.offload and home.type != "cpu":
        model.to("cpu")  # offload: the weights wait on the CPU, one layer at a time visits the device
    batch_tokens = resolve_run(model, config, calibration).batch_tokens
    calibration = calibration_share(calibration)
    quantize_layer = _quantize_layer_sequential if config.schedule == "sequential" else _quantize_layer_two_passes
    layerwise = LayerwiseCalibration(model, calibration, device, batch_tokens)
    layers = layerwise.layers
    kept = kept_float(model, config.ignore)
    with Progress(disable=not show_progress, transient=True) as progress, calibrating_all_experts(model):
        task = progress.add_task("GPTQ", total=len(layers))
        for index, layer in enumerate(layers):
            progress.update(task, description=f"GPTQ layer {index + 1}/{len(layers)}")
            with layerwise.layer_on_device(index) if config.offload else nullcontext():
                linears = {name: m for name, m in quantizable_linears(layer) if id(m) not in kept}
                args = {name: grids[names[id(m)]] for name, m in linears.items()}
                maxima: dict[str, float] = {}
                with observing_input_maxima(linears, maxima) if observed_inputs else nullcontext():
                    # the last layer's outputs feed nothing, unless the head is solved on them
                    last = index + 1 == len(layers) and config.lm_head is None
                    quantize_layer(layerwise, layer, index, linears, args, config, last=last)
                if observed_inputs:
                    set_input_global_scales(linears, maxima)
            for linear in linears.values() if observed_inputs else ():  # inputs on the grid from now on
                enable_fp4_activations(linear)
            if config.offload:
                for linear in linears.values():
                    quant = getattr(linear, QUANT_ATTR)
                    setattr(linear, QUANT_ATTR, replace(quant, **{
                        field: getattr(quant, field).cpu() for field in
                        ("scale", "zero_point", "global_scale", "input_global_scale")
                        if getattr(quant, field) is not None}))
            progress.advance(task)
        if config.lm_head is not None:
            progress.update(task, description="GPTQ lm_head")
            _quantize_head(model, layerwise, config)
    del layerwise
    if model.device != home:
        model.to(home)
    raised = {name: module.__dict__.pop(RAISED_DAMP_ATTR) for name, module in model.named_modules()
              if module is not model and RAISED_DAMP_ATTR in module.__dict__}
    if raised:
        setattr(model, RAISED_DAMP_ATTR, raised)
    return model


def raised_damping(model: torch.nn.Module) -> dict[str, float]:
    """{Linear name: damp used} for every Linear that quantize_gptq solved with more than the configured damp (its
    Hessian was not positive definite with it), else {}. For the step's record."""
    return dict(getattr(model, RAISED_DAMP_ATTR, {}))
