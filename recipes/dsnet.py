"""DS-Net recipe: Stage I (In-place Ensemble Bootstrapping), then gates trained per MACs target.

    accelerate launch recipes/dsnet.py                  # built-in digits, resnet18_ds
    accelerate launch recipes/dsnet.py --help           # every flag (timm train.py names + DS-Net)

The logic lives in timm_slim.dynamic.recipe; see docs/dynamic.md.
"""

import sys

from timm_slim.dynamic.recipe import main

if __name__ == '__main__':
    sys.exit(main())
