"""MobileNetV2's stages, as torchvision numbers them, and where the network can be cut between them.

Plain Python, without TensorFlow: the configuration checks a cut point before any network exists.
"""

from headstart.config import LAST_STAGE

# torchvision's inverted-residual settings: expansion t, output channels c, repeats n, stride s.
INVERTED_RESIDUAL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

# The network's stages as torchvision numbers them: 0 the stem, 1–17 the inverted-residual
# blocks, 18 the final 1×1 convolution; then global pooling.
STEM, HEAD = 0, LAST_STAGE


def blocks() -> list[tuple[int, int, int, int, int]]:
    """Each inverted-residual block as (index, expansion, input channels, output channels, stride)."""
    found, in_channels, index = [], 32, 1
    for expansion, channels, repeats, first_stride in INVERTED_RESIDUAL_SETTINGS:
        for repeat in range(repeats):
            found.append((index, expansion, in_channels, channels, first_stride if repeat == 0 else 1))
            in_channels, index = channels, index + 1
    return found


def channels_into(stage: int) -> int:
    """Channels of the activations that enter stage `stage` (1–18): where the network can be cut."""
    if not STEM < stage <= HEAD:
        raise ValueError(f"the network can be cut before stages 1 to {HEAD}, not {stage}")
    return 32 if stage == 1 else blocks()[stage - 2][3]
