"""Measure every width: MACs and parameters with fvcore, latency, tables and plots.

* **MACs** come from one ``fvcore.nn.FlopCountAnalysis`` per width: tracing records only the
  layers and slices the active width runs, so the supernet at width ``w`` counts what
  ``export(model, w)`` and timm's native variant of that shape count. fvcore counts one
  multiply-accumulate as one flop; ``macs`` sums its conv and linear (matmul) entries, the
  number papers quote, ``flops`` is fvcore's total (it adds eval-mode BatchNorm and pooling).
* **Parameters** are those the width actually uses (the parameters of ``export(model, w)``),
  computed from the channel table, so no export and no calibration is needed.
* **Latency** runs the supernet in place at each width (its layers cache a contiguous copy of
  the active slice), under ``torch.inference_mode``, after a warm-up, with the widths
  interleaved round by round so that machine drift hits every width alike; it reports the
  median and the interquartile range.

A US-Net width without calibrated BatchNorm statistics can still be profiled: its cost does
not depend on the values of the statistics, so profiling borrows the leading slice of the
full-width statistics (the same shapes and the same operations) and never returns outputs.
"""

from .measure import MAC_OPERATORS, channel_summary, count_macs, default_widths, profile, used_parameters
from .plots import METRICS, plot_widths
from .rows import ProfileRows, WidthProfile
from .timing import Timing, paired_ratio, time_interleaved

__all__ = [
    'MAC_OPERATORS',
    'METRICS',
    'ProfileRows',
    'Timing',
    'WidthProfile',
    'channel_summary',
    'count_macs',
    'default_widths',
    'paired_ratio',
    'plot_widths',
    'profile',
    'time_interleaved',
    'used_parameters',
]
