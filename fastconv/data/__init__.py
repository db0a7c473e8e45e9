"""Data sets for the example trainers: the synthetic stripe task and MNIST (IDX files)."""

from .idx import read_idx, write_idx
from .mnist import MnistData, default_cache_dir, download_file, download_mnist, load_idx_dir, load_mnist
from .stripes import make_stripes, stripes_dataset

__all__ = ["MnistData", "default_cache_dir", "download_file", "download_mnist", "load_idx_dir", "load_mnist",
           "make_stripes", "read_idx", "stripes_dataset", "write_idx"]
