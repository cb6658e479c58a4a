"""The exceptions dsfm users see.

Every message says what is wrong, where (file, group or dataset, field, index) and, where there is
one, what to do. Callers catch `DsfmError` to handle any of them.
"""


class DsfmError(Exception):
    """Base of every error dsfm raises on purpose."""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message ("" if none), for one-line errors."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else ""


class ConfigError(DsfmError, ValueError):
    """An argument or configuration value is invalid."""


class DataError(DsfmError):
    """Something is wrong with data on disk."""


class CorruptFileError(DataError):
    """A file cannot be opened or read as HDF5 (truncated, damaged, not HDF5, a directory, or
    not readable by this user)."""


class MissingFileError(DataError, FileNotFoundError):
    """A file of a dataset is not there: deleted, moved, or a symlink whose target is gone.
    Also a FileNotFoundError, as upstream raises for it."""


class SchemaError(DataError):
    """A file is readable but does not follow the declared format (missing group, attribute or
    dataset, or a shape that contradicts its flags)."""


class TooShortError(SchemaError):
    """A trajectory has fewer time steps than one window needs."""


class NonFiniteError(DataError):
    """NaN or Inf found in field data."""


class StatsError(DataError):
    """stats.yaml is missing, unreadable or lacks keys the normalization needs."""


class EmptySplitError(DataError):
    """A split directory has no HDF5 files."""


class CheckpointError(DsfmError):
    """A checkpoint that cannot be read back."""


class SimulationError(DsfmError, FloatingPointError):
    """A simulator produced non-finite values: the time step or resolution is inadequate."""


class PositivityError(SimulationError):
    """Density, depth or pressure reached zero: the flow is too violent for the grid."""
