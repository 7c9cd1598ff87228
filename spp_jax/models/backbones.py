"""The conv layers of the paper's Table 1 backbones, as layer specs.

Map sizes at a 224 input (checked in tests): ZF-5 13x13, Convnet*-5 13x13,
Overfeat-5/7 18x18.  Where the paper only says "the padding is adjusted to
produce the expected output feature map size", the choice made is noted.
"""
from __future__ import annotations

from spp_jax.models.layers import LRN, Conv, Pool

# Released ZF-5 LRN (Caffe WITHIN_CHANNEL).  Also used for Overfeat-5/7, whose LRN
# settings the paper does not give.
_ZF_LRN = dict(size=3, alpha=5e-5, beta=0.75, within_channel=True)
# Convnet*-5 is the authors' AlexNet variant: AlexNet's cross-channel LRN (Caffe's k=1).
_ALEX_LRN = dict(size=5, alpha=1e-4, beta=0.75, within_channel=False)

BACKBONES: dict[str, tuple] = {
    # Released ZF-5: conv1 pad 1, conv2 pad 0, conv3-5 pad 1, Caffe ceil-mode pools.
    "zf5": (
        Conv("conv1", 96, 7, 2, 1), LRN("norm1", **_ZF_LRN), Pool("pool1", 3, 2, ceil_mode=True),
        Conv("conv2", 256, 5, 2, 0), LRN("norm2", **_ZF_LRN), Pool("pool2", 3, 2, ceil_mode=True),
        Conv("conv3", 384, 3, 1, 1), Conv("conv4", 384, 3, 1, 1), Conv("conv5", 256, 3, 1, 1),
    ),
    # conv1 pad 2 gives 55 at 224 (11x11 stride 4); conv2 pad 2 keeps 55.
    "convnet5": (
        Conv("conv1", 96, 11, 4, 2), LRN("norm1", **_ALEX_LRN),
        Conv("conv2", 256, 5, 1, 2), LRN("norm2", **_ALEX_LRN), Pool("pool2", 3, 2),
        Conv("conv3", 384, 3, 1, 1), Pool("pool3", 3, 2),
        Conv("conv4", 384, 3, 1, 1), Conv("conv5", 256, 3, 1, 1),
    ),
    # conv1 pad 1 (as ZF-5) -> 110, floor-mode pool 3/3 -> 36 (ceil mode cannot give 36
    # with a stride-2 conv1); conv2 pad 2 keeps 36, pool 2/2 -> 18.
    "overfeat5": (
        Conv("conv1", 96, 7, 2, 1), Pool("pool1", 3, 3), LRN("norm1", **_ZF_LRN),
        Conv("conv2", 256, 5, 1, 2), Pool("pool2", 2, 2),
        Conv("conv3", 512, 3, 1, 1), Conv("conv4", 512, 3, 1, 1), Conv("conv5", 512, 3, 1, 1),
    ),
}
BACKBONES["overfeat7"] = BACKBONES["overfeat5"] + (
    Conv("conv6", 512, 3, 1, 1), Conv("conv7", 512, 3, 1, 1))

# The no-SPP baselines' last pooling, which makes the 224-input map 6x6 (the 6x6
# pyramid level alone): 13 -> pool 3 stride 2, 18 -> pool 3 stride 3.
NO_SPP_POOL: dict[str, Pool] = {
    "zf5": Pool("pool5", 3, 2, ceil_mode=True),
    "convnet5": Pool("pool5", 3, 2),
    "overfeat5": Pool("pool5", 3, 3),
    "overfeat7": Pool("pool5", 3, 3),
}

MODEL_NAMES: tuple[str, ...] = tuple(BACKBONES)


def check_name(name: str) -> str:
    if name not in BACKBONES:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    return name
