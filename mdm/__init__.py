"""mdm: Matryoshka Diffusion Models in pure PyTorch (no Ray in this package)."""

from .config import ConditioningConfig, ConfigError, DiffusionConfig, MDMConfig, ModelConfig, UNetConfig
from .diffusion import MultiResolutionDiffusion, ShiftedCosineSchedule, image_pyramid
from .growth import grow
from .pipeline import MDMPipeline
from .presets import get_config, list_configs
from .training import Batch, TrainConfig, TrainStep
from .unet import Condition, MDMModel, NestedUNet
from .weights import EMA, load_pretrained, save_pretrained

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Condition",
    "ConditioningConfig",
    "ConfigError",
    "DiffusionConfig",
    "EMA",
    "MDMConfig",
    "MDMModel",
    "MDMPipeline",
    "ModelConfig",
    "MultiResolutionDiffusion",
    "NestedUNet",
    "ShiftedCosineSchedule",
    "TrainConfig",
    "TrainStep",
    "UNetConfig",
    "get_config",
    "grow",
    "image_pyramid",
    "list_configs",
    "load_pretrained",
    "save_pretrained",
]
