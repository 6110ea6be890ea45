"""normext: fast, exact, drop-in normalization layers for PyTorch.

    model = normext.convert(model)        # torch.nn's norm layers swapped for normext's
    layer = normext.BatchNorm2d(64)       # or use the modules directly
    model = normext.fuse(model)           # BatchNorm + activation (+ add) fused
"""

from . import functional, ops
from ._extension import build_info, cached_cpu_bytes, cpu_cache_info, release_cpu_cache
from .convert import convert
from .fuse import FuseReport, fuse
from .modules import (AddLayerNorm, AddRMSNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d,
                      BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, GroupNorm, GroupNormAct,
                      InstanceNorm1d,
                      InstanceNorm2d, InstanceNorm3d, LayerNorm, LazyBatchNorm1d,
                      LazyBatchNorm2d, LazyBatchNorm3d, LazyInstanceNorm1d, LazyInstanceNorm2d,
                      LazyInstanceNorm3d, RMSNorm)
from .sync_batchnorm import SyncBatchNorm, SyncBatchNormAct

__version__ = "0.1.0"
__all__ = ["AddLayerNorm", "AddRMSNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "FuseReport", "GroupNorm",
           "GroupNormAct",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "LazyBatchNorm1d",
           "LazyBatchNorm2d", "LazyBatchNorm3d", "LazyInstanceNorm1d", "LazyInstanceNorm2d",
           "LazyInstanceNorm3d", "RMSNorm", "SyncBatchNorm", "SyncBatchNormAct", "build_info",
           "cached_cpu_bytes", "convert", "cpu_cache_info", "functional", "fuse", "ops",
           "release_cpu_cache"]
