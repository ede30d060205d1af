"""Models for certified training: the :class:`Normalize` input layer and the standard CNNs
(flat ``nn.Sequential``, inputs in pixel space ``[0, 1]``)."""
from adcert.models.normalize import Normalize
from adcert.models.cnn import (
    CIFAR10_MEAN, CIFAR10_STD, MNIST_MEAN, MNIST_STD, cnn3, cnn7,
)

__all__ = ["Normalize", "cnn3", "cnn7", "CIFAR10_MEAN", "CIFAR10_STD", "MNIST_MEAN", "MNIST_STD"]
