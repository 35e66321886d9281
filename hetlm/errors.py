"""Errors the CLI turns into one line on stderr and an exit code."""


class HetlmError(Exception):
    """A failure the user can act on. Exit code 1: something went wrong at run time."""

    exit_code = 1


class UsageError(HetlmError):
    """Bad arguments, bad configuration or bad input data. Exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """An invalid configuration key or value."""
