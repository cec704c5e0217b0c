"""Errors that are the user's to fix: printed by the CLI as one line, never as a traceback."""


class UserError(Exception):
    """Base class: bad input, missing file, bad parameter. The message names the file or parameter."""


class DataError(UserError, ValueError):
    """An LA-layout data folder, case file or list file is missing or invalid."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, truncated, or not a dkuxnet checkpoint."""


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""
