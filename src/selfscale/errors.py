"""The errors selfscale reports to users as one line (exit code 2) instead of a traceback."""


class SelfscaleError(Exception):
    """A problem the user can fix: a bad option value, a missing or unusable file.

    The CLI prints ``selfscale: error: <message>`` and exits with code 2.
    """


class ConfigError(SelfscaleError):
    """An option or config-file value is out of range or of the wrong kind."""


class DataError(SelfscaleError):
    """No usable images, unreadable data folders, mismatched input/target pairs."""


class CheckpointError(SelfscaleError):
    """A run directory or checkpoint is missing, corrupt or incompatible."""


class TrainingError(SelfscaleError):
    """Training went wrong (a non-finite loss or weight): the CLI prints one line and exits with
    code 1; the last good checkpoint is kept."""
