"""User-facing errors.

Every error a user can cause (bad config, bad data file, missing model, unwritable output) is raised
as an ``IA2Error`` whose message is ONE line: what is wrong, where (file/line/field) and how to fix
it. The CLI prints ``error: <message>`` and exits with status 2. Internal invariants use ``assert``.
"""

from __future__ import annotations


class IA2Error(Exception):
    """An error caused by user input; its message is a single actionable line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(IA2Error):
    """One or more config fields are invalid; ``problems`` lists each as 'field: what; fix'."""

    def __init__(self, problems: list[str], source: str | None = "config"):
        self.problems = list(problems)
        joined = "; ".join(self.problems)
        count = f"{len(self.problems)} problem{'s' if len(self.problems) > 1 else ''}"
        super().__init__(f"{count}{f' in {source}' if source else ''}: {joined}")


class DataError(IA2Error):
    """A data file or data setting is unusable (malformed line, missing field, too few rows...)."""


class RowError(DataError):
    """A row lacks a field or holds a wrong-typed value. The message names the row's uid; the
    loader re-raises it with the file:line (or hub row) it came from via ``at``."""

    def __init__(self, uid: str, field_name: str, problem: str, fix: str):
        self.field_name, self.problem, self.fix = field_name, problem, fix
        super().__init__(f"row {uid}: field {field_name!r} {problem}; {fix}")

    def at(self, where: str) -> DataError:
        return DataError(f"{where}: field {self.field_name!r} {self.problem}; {self.fix}")
