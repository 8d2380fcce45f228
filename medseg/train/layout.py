"""Channels-last for the narrow convolutions of a CPU training step, where a quick measurement says it pays.

oneDNN's CPU convolutions work on channels in blocks of 16 (AVX-512). A layer whose channel counts are not a
multiple of that takes a slow path in the default (contiguous) layout: on a 2-core AMD EPYC Zen 4 the forward and
backward pass of MONAI UNet's last 3 -> 3 convolution at the hippocampus patch took 57.3 ms in bfloat16 and 56.6 ms
in float32, and 12.1 / 18.7 ms with its input in the channels-last layout; 14 -> 14 channels 98 against 40 ms
(bfloat16; BENCHMARKS.md, "Training throughput", ``benchmarks/train_speed.py narrow``). Converting the whole
network does not pay under bfloat16 on an Intel Xeon with AMX (1.45x slower), and converting the last transposed
convolution too was slower on Zen 4. So medseg converts only these layers, and only where timing the layer both ways
at the start of training says so: the layouts' speeds differ between CPUs. torch's own ``memory_format`` option
converts a whole module's weights; here the layer's input goes channels-last and its output back to contiguous (two
copies of a few MB), by forward hooks, so the network's state dict and every other layer stay as they are.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

BLOCK = 16  # oneDNN's channel block on AVX-512 CPUs
PAYS = 0.8  # channels-last when the layer's measured step takes at most this share of the default's


def narrow_convolutions(model: torch.nn.Module) -> dict[str, torch.nn.Conv2d | torch.nn.Conv3d]:
    """The network's 2D and 3D convolutions (not transposed) with a channel count off ``BLOCK``."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Conv2d | torch.nn.Conv3d)
        and module.groups == 1
        and (module.in_channels % BLOCK or module.out_channels % BLOCK)
    }


def layer_inputs(
    model: torch.nn.Module, layers: dict[str, torch.nn.Module], input_shape: Sequence[int]
) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Each layer's input when the network takes a batch of ``input_shape``: its shape, and whether a training step
    computes its gradient (not where the layer is fed the image itself). One forward pass at batch 1 in eval mode (no
    dropout draws, no normalisation statistics updated), its graph recorded but never run backward."""
    inputs: dict[str, tuple[tuple[int, ...], bool]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:  # returns None: input unchanged
            inputs.setdefault(name, (tuple(args[0].shape), bool(args[0].requires_grad)))

        return hook

    handles = [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()]
    training = model.training
    try:
        model.eval()
        parameter = next(model.parameters())
        with torch.enable_grad():
            model(torch.zeros(1, *input_shape[1:], dtype=parameter.dtype, device=parameter.device))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    batch = int(input_shape[0])  # a 2D network's layers take batch x Z slices
    return {name: ((shape[0] * batch, *shape[1:]), grad) for name, (shape, grad) in inputs.items()}


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)


def step_ms(
    conv: torch.nn.Conv2d | torch.nn.Conv3d,
    shape: tuple[int, ...],
    autocast: torch.dtype | None,
    iterations: int = 3,
    input_grad: bool = True,
) -> tuple[float, float]:
    """Median milliseconds of the layer's forward and backward pass on a random input of ``shape`` (the input's
    gradient too with ``input_grad``): in the default layout, and with the input converted to channels-last and the
    output back (the copies included), alternated. On copies of the weights, with its own random generator: the
    model and torch's random state stay untouched."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    weight = conv.weight.detach().clone().requires_grad_()
    bias = None if conv.bias is None else conv.bias.detach().clone().requires_grad_()
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(iterations + 1):  # the first round warms oneDNN's kernels up and is not counted
        for channels_last in (False, True):
            start = time.perf_counter()
            inputs = (_channels_last(x) if channels_last else x).detach().requires_grad_(input_grad)  # a fresh leaf
            with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
                out = conv._conv_forward(inputs, weight, bias)
            out.contiguous().sum().backward()
            if i:
                times[channels_last].append(1000 * (time.perf_counter() - start))
    return statistics.median(times[False]), statistics.median(times[True])


def _to_channels_last(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (_channels_last(args[0]), *args[1:])


def _to_contiguous(_module: torch.nn.Module, _args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    return output.contiguous()


def convert_layers(model: torch.nn.Module, names: list[str]) -> list[str]:
    """Run the named layers of ``model`` on channels-last input, their outputs returned contiguous (forward hooks;
    the weights untouched). Returns ``names``.

    Raises:
        KeyError: ``model`` has no layer of one of the names.
    """
    layers = dict(model.named_modules())
    for name in names:
        layers[name].register_forward_pre_hook(_to_channels_last)
        layers[name].register_forward_hook(_to_contiguous)
    return list(names)


def narrow_channels_last(
    model: torch.nn.Module, input_shape: Sequence[int], autocast: torch.dtype | None, wanted: bool | None
) -> list[str]:
    """Convert the network's narrow convolutions where channels-last pays (``wanted`` null: measured per layer;
    true: all of them; false: none), before the network is compiled. Returns the converted layers' names."""
    layers = narrow_convolutions(model) if wanted is not False else {}
    if not layers:
        return []
    if wanted:
        chosen = list(layers)
    else:
        chosen, timings = [], []
        try:
            for name, (shape, grad) in layer_inputs(model, layers, input_shape).items():
                default_ms, channels_last_ms = step_ms(layers[name], shape, autocast, input_grad=grad)
                timings.append(f"{name} {default_ms:.1f} -> {channels_last_ms:.1f} ms")
                if channels_last_ms <= PAYS * default_ms:
                    chosen.append(name)
        except Exception as error:  # a speed-up is never worth a failed run: train in the default layout
            log.warning("timing the narrow convolutions failed (%s: %s): default layout", type(error).__name__, error)
            return []
        log.info("narrow convolutions, forward and backward, default -> channels-last: %s", "; ".join(timings))
    if chosen:
        log.info("training the narrow convolution(s) %s channels-last", ", ".join(chosen))
    return convert_layers(model, chosen)
