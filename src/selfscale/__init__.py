"""selfscale: train a small fully convolutional network to imitate an image operator, then shrink it."""

__version__ = "0.3.0.dev0"
