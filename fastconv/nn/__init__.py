"""A minimal CNN toolkit with hand-written backward passes, built on fastconv's kernels.

>>> import numpy as np
>>> from fastconv import nn
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, rng=0), nn.ReLU(), nn.GlobalAvgPool2d(),
...                       nn.Linear(4, 2, rng=0))
>>> logits = model(np.zeros((5, 1, 8, 8), dtype=np.float32))
>>> logits.shape
(5, 2)
"""

from .gradcheck import GradcheckResult, gradcheck
from .layers import AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool2d, Linear, MaxPool2d, ReLU
from .loss import CrossEntropyLoss, log_softmax, softmax
from .models import simple_cnn, stripes_net
from .module import Module, Parameter, Sequential
from .optim import SGD, Adam, Optimizer
from .trainer import EpochStats, History, confusion_matrix, evaluate, fit, predict

__all__ = [
    "Adam", "AvgPool2d", "BatchNorm2d", "Conv2d", "CrossEntropyLoss", "Dropout", "EpochStats", "Flatten",
    "GlobalAvgPool2d", "GradcheckResult", "History", "Linear", "MaxPool2d", "Module", "Optimizer", "Parameter",
    "ReLU", "SGD", "Sequential", "confusion_matrix", "evaluate", "fit", "gradcheck", "log_softmax", "predict",
    "simple_cnn", "softmax", "stripes_net",
]
