"""S-Net recipe: a fixed list of widths, each with its own (switchable) BatchNorm, all trained every step.

    accelerate launch recipes/snet.py                   # built-in digits, mobilenetv2_100_slim, 15 epochs
    accelerate launch recipes/snet.py --help            # every flag (timm train.py names)

The logic lives in timm_slim.train.recipe; see docs/training.md.
"""

import sys

from timm_slim.train.recipe import main

if __name__ == '__main__':
    sys.exit(main('snet'))
