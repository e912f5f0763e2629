"""msfin_fast: an inference engine for MSFIN / MSFIN-S image super-resolution.

Read top-down, the package follows the data: ``config`` → ``model`` (the reference) →
``weights`` (loading) → ``engine`` (``optimize``: backends and their kernels) → ``pictures`` (images
in and out of the model's tensors) → ``run`` (how one forward runs: tiles, memory, self-ensemble,
batches) → ``upscaler`` (the user API) → ``folders`` (``upscale_folder``) and ``serving`` (batching for
services); ``video``, ``cluster`` (Ray) and ``train`` build on those; ``devices`` resolves devices
and dtypes for all of them; ``evaluate`` holds the paper's metrics. ARCHITECTURE.md draws it.
"""

__version__ = "0.1.0"

from . import _checkout  # noqa: F401  (first: maps msfin_fast.kernels in an uninstalled checkout)
from .config import PRESETS, MSFINConfig, get_config
from .errors import (
    ConfigError,
    DeviceError,
    ImageReadError,
    ImageWriteError,
    InvalidInputError,
    NonFiniteOutputError,
    MSFINError,
    QueueFullError,
    WeightsError,
)
from .engine import Engine, optimize
from .export import export_onnx  # onnx and onnxscript are imported only when a model is exported
from .folders import FileResult, FolderSummary, upscale_folder
from .model import MSFIN, msfin_s_x4, msfin_x4
from .serving import ServingUpscaler
from .upscaler import Upscaler
from .video import EncodeOptions, VideoSummary, upscale_video  # PyAV is imported only when a video runs
from .weights import load_pretrained

__all__ = [
    "PRESETS", "MSFINConfig", "get_config",
    "MSFIN", "msfin_x4", "msfin_s_x4", "load_pretrained", "Upscaler", "ServingUpscaler", "optimize", "Engine",
    "upscale_folder", "FolderSummary", "FileResult",
    "upscale_video", "EncodeOptions", "VideoSummary", "export_onnx",
    "MSFINError", "ConfigError", "DeviceError", "ImageReadError", "ImageWriteError",
    "InvalidInputError", "NonFiniteOutputError", "QueueFullError", "WeightsError",
]

# Training (the paper's recipe). The function msfin_fast.train.train is not re-exported: the name
# would hide the msfin_fast.train package.
from .errors import DatasetError, TrainingError  # noqa: E402
from .train import TrainConfig, Trainer  # noqa: E402

__all__ += ["TrainConfig", "Trainer", "DatasetError", "TrainingError"]
