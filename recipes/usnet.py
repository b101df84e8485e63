"""US-Net recipe: any width in a range, sandwich rule, inplace distillation, BN calibrated per width.

    accelerate launch recipes/usnet.py                  # built-in digits, mobilenetv2_100_slim, 15 epochs
    accelerate launch recipes/usnet.py --help           # every flag (timm train.py names)

The logic lives in timm_slim.train.recipe; see docs/training.md.
"""

import sys

from timm_slim.train.recipe import main

if __name__ == '__main__':
    sys.exit(main('usnet'))
