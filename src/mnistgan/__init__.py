"""mnistgan: a small fully connected GAN trained by Cython kernels over BLAS."""
from . import parallel  # noqa: F401  (first: it tunes OpenBLAS's threads before scipy loads it)
from ._version import __version__
from .config import Config
from .gan import GAN, StepStats
from .network import DenseStack
from .trainer import Trainer, TrainingDiverged

__all__ = ["__version__", "Config", "GAN", "StepStats", "DenseStack", "Trainer", "TrainingDiverged"]
