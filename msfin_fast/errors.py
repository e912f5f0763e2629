"""Typed errors. Every message says what went wrong and what to do about it."""


class MSFINError(Exception):
    """Base class for every error msfin_fast raises on purpose."""


class ConfigError(MSFINError, ValueError):
    """An unknown preset or an impossible model configuration."""


class InvalidInputError(MSFINError, ValueError):
    """A tensor or array that the model cannot take (shape, dtype, size, NaN/Inf)."""


class WeightsError(MSFINError):
    """Weights that cannot be found, downloaded, verified or loaded into the model."""


class ImageReadError(MSFINError, OSError):
    """A file that does not exist, cannot be read, or is not a supported image."""


class ImageWriteError(MSFINError, OSError):
    """An output that cannot be written."""


class DeviceError(MSFINError, RuntimeError):
    """A device or precision that this machine cannot provide."""


class DatasetError(MSFINError, ValueError):
    """A training or validation folder with no usable images, or with images that cannot be used."""


class TrainingError(MSFINError, RuntimeError):
    """A training run that cannot start, resume or go on (diverged, finished, wrong folder)."""


class QueueFullError(MSFINError, RuntimeError):
    """A serving queue that is full: the request was not taken; retry later or add capacity."""


class NonFiniteOutputError(MSFINError, ArithmeticError):
    """The model produced NaN or Inf for an input that was finite (an overflow): no image is made
    from it, since NaN would be written as black."""
