"""Per-channel gradient normalisation: each output channel's gradient averaged over the widths that used it.

In one multi-width step the gradients of every width add up in the shared weights. A leading
channel takes part in every width's forward and backward, so it receives ``n`` gradients; a
trailing one takes part only in the widest, so it receives one. With one learning rate the
leading channels therefore move up to ``n`` times as far per step (the notes behind the project
ask whether that is why a supernet needs a smaller learning rate than one model). With
``grad_norm='per-channel'`` the trainer divides the gradient of every output channel (row ``c``
of a conv/linear weight, entry ``c`` of a bias or BatchNorm parameter) by the number of widths
of the step that used that channel, so every channel steps by the mean of its widths' gradients
and the single-model learning rate applies to all of them.

Which channels a width used is read from the layers' outputs in the forward pass (a forward hook
per module that owns parameters: ``output.shape[1]`` channels ran), so it needs no knowledge of
the channel rule. Private per-width BatchNorms (S-Net) are used by one width each and are left
as they are; the classifier's outputs and any layer that does not slim are used by every width,
so their gradients are divided by ``n`` (the mean over the widths).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from ..control import unwrap

__all__ = ['GRAD_NORMS', 'ChannelUseCounter']

GRAD_NORMS = ('none', 'per-channel')
"""The values of the recipes' ``--grad-norm``: the papers' plain sum of the widths' gradients, or
each output channel's gradient divided by the number of widths that used it."""


class ChannelUseCounter:
    """Count, per parameter and output channel, the widths of one step that used it; then divide.

    ``train_step(..., grad_norm='per-channel')`` uses it so; in a loop of your own:

    ```python
    counter = ChannelUseCounter(model)
    with counter:
        for width in widths:
            ...  # set the width, forward, backward
            counter.end_pass()
    counter.normalise(passes_per_width=len(micro_batches))
    ```
    """

    def __init__(self, model: nn.Module) -> None:
        self.net = unwrap(model)
        self._params: Dict[nn.Module, List[nn.Parameter]] = {}
        for module in self.net.modules():
            params = [p for p in module.parameters(recurse=False) if p.requires_grad and p.dim() >= 1]
            if params:
                self._params[module] = params
        self.counts: Dict[nn.Parameter, torch.Tensor] = {}
        self._seen: Dict[nn.Module, int] = {}
        self._handles: List[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, module: nn.Module, inputs: Tuple, output) -> None:
        if getattr(module, 'private_key', None) is not None:
            return  # an S-Net's private BatchNorm ran, not this module's own parameters
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            return
        self._seen[module] = max(self._seen.get(module, 0), int(out.shape[1]))

    def __enter__(self) -> ChannelUseCounter:
        self.counts.clear()
        self._seen.clear()
        self._handles = [m.register_forward_hook(self._hook) for m in self._params]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def end_pass(self) -> None:
        """One width's forward is done: add its channels to the counts."""
        for module, channels in self._seen.items():
            for param in self._params[module]:
                count = self.counts.get(param)
                if count is None:
                    count = self.counts[param] = torch.zeros(param.shape[0], device=param.device)
                count[:min(channels, param.shape[0])] += 1
        self._seen.clear()

    @torch.no_grad()
    def normalise(self, passes_per_width: int = 1) -> None:
        """Divide each counted parameter's gradient, channel by channel, by the number of widths
        that used the channel (``passes_per_width`` forwards per width: micro-batches)."""
        for param, count in self.counts.items():
            if param.grad is None:
                continue
            widths = (count / passes_per_width).clamp_min(1.0)
            param.grad.div_(widths.reshape(-1, *([1] * (param.grad.dim() - 1))).to(param.grad.dtype))
