"""Error types whose message is one line: the input that is wrong and how to fix it."""


class MosaicError(Exception):
    """Base class: the CLI prints ``str(err)`` and exits non-zero; Dagster shows the same line."""


class ConfigError(MosaicError, ValueError):
    """The experiment config is wrong (key path + what is allowed)."""


class DatasetError(MosaicError, ValueError):
    """A dataset cannot be read or normalised (field + fix)."""


class ModelError(MosaicError, ValueError):
    """A model cannot be loaded or a layer does not exist."""


class CacheError(MosaicError):
    """A cache file is unreadable; callers recompute rather than crash."""
