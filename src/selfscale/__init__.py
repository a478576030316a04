"""selfscale: train a small fully convolutional network to imitate an image operator, then shrink it."""

__version__ = "0.2.0"
