"""Calibration for GPTQ: token windows from a text, and a transformers model run one decoder layer at a time.

GPTQ quantizes a layer from the activations that reach it. They are taken from the model as it is
being quantized: the inputs of layer ``i`` come out of layers ``0..i-1`` already quantized, so each
layer corrects for the errors of the ones before it. Running the model layer by layer keeps only
one layer's activations in memory and needs nothing of the engine: forward hooks on a
transformers model capture the first layer's inputs (with the attention mask and rotary
embeddings the model computed for them), and every later layer is called with its predecessor's outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

DEFAULT_CALIBRATION_FILE = "calibration.txt"


def default_calibration_text() -> str:
    """The calibration text shipped in ``minipaged/data`` (varied prose and code)."""
    return resources.files("minipaged.data").joinpath(DEFAULT_CALIBRATION_FILE).read_text(encoding="utf-8")


def calibration_windows(token_ids: list[int], seq_len: int, max_samples: int) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seq_len`` tokens, at most ``max_samples``:
    int64 ``[num_samples, seq_len]``. A text shorter than one window gives one shorter window."""
    if not token_ids:
        raise ValueError("the calibration text has no tokens")
    if len(token_ids) < seq_len:
        return torch.tensor([token_ids], dtype=torch.int64)
    count = min(len(token_ids) // seq_len, max_samples)
    return torch.tensor(token_ids[: count * seq_len], dtype=torch.int64).view(count, seq_len)


def tokenize_calibration(tokenizer: Any, text: str | Path | None, seq_len: int, max_samples: int) -> torch.Tensor:
    """Token windows ``[num_samples, seq_len]`` of ``text`` (a path, a string, or ``None`` for the shipped text)."""
    if text is None:
        text = default_calibration_text()
    elif isinstance(text, Path):
        text = text.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return calibration_windows(list(ids), seq_len, max_samples)


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are in hand."""


@dataclass
class LayerInputs:
    """What one decoder layer is called with, per calibration batch: ``hidden [B, T, hidden]`` and keywords."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


def capture_first_layer_inputs(model: Any, windows: torch.Tensor, batch_size: int) -> LayerInputs:
    """Run ``model`` (a transformers causal LM) up to its first decoder layer on each batch of
    ``windows [S, T]`` and keep that layer's inputs."""
    layer = model.model.layers[0]
    inputs = LayerInputs([], [])

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.hidden.append(hidden.detach())
        inputs.kwargs.append(dict(kwargs))
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return inputs


def run_layer(layer: torch.nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
    """``layer``'s output hidden states for every batch of ``inputs``."""
    outputs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
        out = layer(hidden, **kwargs)
        outputs.append((out[0] if isinstance(out, tuple) else out).detach())
    return outputs


def observe_linears(layer: torch.nn.Module, inputs: LayerInputs, callback: Callable[[str, torch.Tensor], None]) -> None:
    """Run ``layer`` on ``inputs`` and call ``callback(name, x)`` with the input ``x [B, T, K]`` of
    every ``nn.Linear`` inside it (``name`` relative to the layer, e.g. ``self_attn.q_proj``)."""
    handles = [
        module.register_forward_hook(lambda mod, args, out, name=name: callback(name, args[0]))
        for name, module in layer.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    try:
        run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()


def layer_by_layer(
    model: Any, windows: torch.Tensor, batch_size: int = 8
) -> Iterator[tuple[int, torch.nn.Module, LayerInputs]]:
    """Yield ``(index, layer, inputs)`` for each decoder layer of a transformers causal LM, in order,
    ``inputs`` being what reaches the layer on the calibration ``windows [S, T]``.

    The caller may change the layer's weights (quantize them) before asking for the next layer:
    the next layer's inputs are computed only then, through the layer as it is now.
    """
    inputs = capture_first_layer_inputs(model, windows, batch_size)
    for index, layer in enumerate(model.model.layers):
        yield index, layer, inputs
        inputs = LayerInputs(run_layer(layer, inputs), inputs.kwargs)
