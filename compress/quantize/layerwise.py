"""Layer-wise sequential calibration: the calibration batches are run through the model one decoder layer at a time,
so each layer is calibrated on the outputs of the already-quantized layers before it (GPTQ paper, §4 "Step 3").

Two memory modes. Resident: the whole model sits on the calibration device (fastest). Offload: the weights stay on
the CPU and one decoder layer at a time visits the GPU; only that layer, the hidden states of the calibration set
and the layer's Hessians occupy GPU memory."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from compress.errors import CompressError
from compress.modules import decoder_layers


class _Captured(Exception):
    """Raised by the hook on the first decoder layer once its inputs are recorded: the rest of the model is skipped."""


class LayerwiseCalibration:
    """The calibration set's hidden states at the input of the current decoder layer, in chunks of about
    `batch_tokens` tokens, with the keyword arguments (rotary embeddings, mask) each chunk's layer call needs."""

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, device: torch.device, batch_tokens: int):
        self.model, self.device = model, device
        self.layers = decoder_layers(model)
        samples_per_chunk = max(1, batch_tokens // input_ids.shape[1])
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[dict] = []
        with self._on_device([m for m in model.get_decoder().children() if m is not self.layers]):
            handle = self.layers[0].register_forward_pre_hook(self._record, with_kwargs=True)
            try:
                for chunk in input_ids.split(samples_per_chunk):
                    try:
                        model(input_ids=chunk.to(device), use_cache=False)
                    except _Captured:
                        pass
            finally:
                handle.remove()

    def _record(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.hidden.append(hidden)
        self.kwargs.append({k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")})
        raise _Captured

    @contextmanager
    def _on_device(self, modules: list[torch.nn.Module]):
        """Move modules to the calibration device for the duration, then back where they were."""
        homes = [next(m.parameters(), next(m.buffers(), torch.empty(0))).device for m in modules]
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module, home in zip(modules, homes):
                module.to(home)

    def on_device(self, modules: list[torch.nn.Module]):
        """Context: `modules` on the calibration device (a no-op for those already there)."""
        return self._on_device(modules)

    def layer_on_device(self, index: int):
        """Context: decoder layer `index` on the calibration device (a no-op when the model is resident)."""
        return self._on_device([self.layers[index]])

    def run(self, layer: torch.nn.Module, stop: type[Exception], samples: int | None = None) -> None:
        """A calibration pass: call `layer` on every chunk (or on the first `samples` samples only) for its hooks,
        discarding outputs. A hook may raise `stop` once it has seen what it needs (e.g. the last Linear's input),
        which skips the rest of the layer."""
        for hidden, kwargs in zip(self.hidden, self.kwargs):
            if samples is not None:
                batch = hidden.shape[0]
                hidden = hidden[:samples]
                kwargs = {k: v[:samples] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch > 1
                          else v for k, v in kwargs.items()}
            try:
                layer(hidden, **kwargs)
            except stop:
                pass
            if samples is not None:
                return

    def propagate(self, layer: torch.nn.Module, index: int) -> None:
        """Replace each chunk's hidden states with `layer`'s output: the next layer's calibration input."""
        for j, (hidden, kwargs) in enumerate(zip(self.hidden, self.kwargs)):
            output = layer(hidden, **kwargs)
            output = output[0] if isinstance(output, tuple) else output
            if not torch.isfinite(output).all():
                raise CompressError(f"decoder layer {index} produced NaN/inf on calibration batch {j}; the weights "
                                    f"or the dtype overflow (with float16, try dtype bfloat16 or float32)")
            self.hidden[j] = output
