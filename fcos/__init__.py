"""FCOS as a detectron2 project: importing this package registers the meta-architecture and backbone."""

from .backbone import build_fcos_resnet_fpn_backbone
from .checkpoint import CheckpointMismatchError, FCOSCheckpointer
from .config import FCOSConfigError, add_fcos_config, validate_fcos_config
from .meta_arch import FCOS
from .tta import FCOSWithTTA

__all__ = [
    "CheckpointMismatchError",
    "FCOS",
    "FCOSCheckpointer",
    "FCOSConfigError",
    "FCOSWithTTA",
    "add_fcos_config",
    "build_fcos_resnet_fpn_backbone",
    "validate_fcos_config",
]
