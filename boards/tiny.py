"""``quarry_tiny``: an MNIST model small enough for the iCEBreaker's memories.

The default model (``quarry_cnn``, 16 channels at 28x28) needs about 100 kbit of scratchpad and,
on a small array, more than 100 kbit of instructions: more than the UP5K's 120 kbit of block RAM
before weights, parameters and accumulators. This one averages the image down to 14x14 first
(on the accelerator: a POOL), then runs two 3x3 convolutions (4 and 8 channels) with a max-pool
between them, global average pooling and a linear classifier.

It is trained with the zoo's MNIST recipe and cache (``build/zoo``): :func:`register` adds it to
:data:`compiler.zoo.MODELS` for this process, so ``compiler.zoo.trained("quarry_tiny")`` works.
"""

import torch.nn as nn

__all__ = ["TinyCNN", "NAME", "COMPILE_OPTIONS", "register"]

NAME = "quarry_tiny"
#: Quantization for W4A4 (``compiler.compile`` keywords). With four channels every weight
#: matters: on 300 MNIST test images (2x1 array) percentile ranges give 47 %, MSE ranges for
#: activations and weights with bias correction 64 % (W8A8: 85 %, float: 87.5 %).
COMPILE_OPTIONS = {"method": "mse", "weight_method": "mse", "bias_correction": True}


class TinyCNN(nn.Module):
    def __init__(self, width: int = 4, classes: int = 10):
        super().__init__()
        w = width
        self.down = nn.AvgPool2d(2)
        self.conv1 = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x):
        x = self.pool(self.conv1(self.down(x)))
        return self.fc(self.gap(self.conv2(x)).flatten(1))


def register() -> None:
    """Make ``quarry_tiny`` a zoo model in this process (idempotent)."""
    from compiler import zoo

    zoo.MODELS.setdefault(NAME, TinyCNN)
