"""fastconv: fast 2-D convolution and pooling kernels behind one NumPy-style API.

>>> import numpy as np, fastconv
>>> x = np.random.rand(8, 3, 32, 32).astype(np.float32)
>>> w = np.random.rand(16, 3, 3, 3).astype(np.float32)
>>> fastconv.conv2d(x, w, padding="same").shape
(8, 16, 32, 32)
"""

from . import _config

_config.default_openmp_wait()  # before any backend loads libgomp

from ._config import (  # noqa: E402
    get_autotune,
    get_num_threads,
    get_workspace_limit,
    set_autotune,
    set_num_threads,
    set_workspace_limit,
    single_threaded_blas,
)
from ._dispatch import available_backends, get_backend, use_backend  # noqa: E402
from .functional import (  # noqa: E402
    Conv2dGrads,
    avg_pool2d,
    avg_pool2d_backward,
    conv2d,
    conv2d_backward,
    convolve2d,
    correlate2d,
    max_pool2d,
    max_pool2d_backward,
)
from .shapes import conv_output_size, conv_params, receptive_field  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Conv2dGrads",
    "available_backends",
    "avg_pool2d",
    "avg_pool2d_backward",
    "conv2d",
    "conv2d_backward",
    "conv_output_size",
    "conv_params",
    "convolve2d",
    "correlate2d",
    "get_autotune",
    "get_backend",
    "get_num_threads",
    "get_workspace_limit",
    "max_pool2d",
    "max_pool2d_backward",
    "receptive_field",
    "set_autotune",
    "set_num_threads",
    "set_workspace_limit",
    "single_threaded_blas",
    "use_backend",
]
