"""Errors the pipeline raises on purpose: each message names the file, record or key to fix."""


class LoraflowError(Exception):
    """Base class: the CLI and the step entry points print these as one line, with no traceback."""


class ConfigError(LoraflowError, ValueError):
    """A params file or override that cannot be used."""


class ModelSpecError(LoraflowError, ValueError):
    """A model spec that cannot be resolved to something loadable."""


class CurationError(LoraflowError):
    """Raw data from which nothing usable could be read."""


class ValidationFailed(LoraflowError):
    """The curated data broke an expectation of the validation gate."""


class EvalSetError(LoraflowError, ValueError):
    """An eval or guard set that cannot be scored."""


class DiskFull(LoraflowError):
    """A write that found no room on its file system: the message names the path, the space needed and free."""
