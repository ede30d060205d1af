"""Models for certified training: the :class:`Normalize` input layer, the standard CNNs (flat
``nn.Sequential``, inputs in pixel space ``[0, 1]``), a small ResNet (a module graph, not a
Sequential), initialisations and a by-name registry."""
from adcert.models.normalize import Normalize
from adcert.models.cnn import (
    CIFAR10_MEAN, CIFAR10_STD, MNIST_MEAN, MNIST_STD, cnn3, cnn5, cnn7, cnn7_tinyimagenet,
)
from adcert.models.init import ibp_init, kaiming_init
from adcert.models.resnet import BasicBlock, ResNet, resnet
from adcert.models.registry import MODELS, build_model

__all__ = ["Normalize", "cnn3", "cnn5", "cnn7", "cnn7_tinyimagenet", "CIFAR10_MEAN",
           "CIFAR10_STD", "MNIST_MEAN", "MNIST_STD", "ibp_init", "kaiming_init", "MODELS",
           "build_model", "ResNet", "BasicBlock", "resnet"]
