"""Errors a user can cause. The CLI prints them as one line and exits with `exit_code`.

Everything that is the user's mistake (a config field, a data file, a plugin name) raises a subclass
of :class:`ThresherError`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ThresherError(Exception):
    """A user-facing error: its message is complete on its own, no traceback needed."""

    exit_code = 1


class ConfigError(ThresherError):
    """The run configuration is invalid; carries one `loc: message` line per problem."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class PluginError(ThresherError):
    """A plugin is unknown, registered twice, or does not follow its kind's protocol."""

    exit_code = 2


class DataError(ThresherError):
    """A prompt file is missing, malformed or empty; the message names file, line and field."""

    exit_code = 2


class ScorerError(ThresherError):
    """A reward function or reward model failed or returned something that is not a reward."""

    exit_code = 3


class ScoringInterrupted(ThresherError):
    """A scorer stopped early because the run was asked to stop (its ``should_stop`` said so)."""

    exit_code = 130


class OutputError(ThresherError):
    """The run directory cannot hold what the run must write (permissions, a full disk)."""

    exit_code = 4


class GeneratorError(ThresherError):
    """The generation engine cannot run as configured, or lost track of the policy's weights."""

    exit_code = 6
