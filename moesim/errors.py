"""Errors that moesim reports to users.

Every problem with user input is raised as :class:`InputError`, which renders as one line naming the
file (when there is one), the field and what was expected. The CLI turns it into exit code 2.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a scenario, cluster, trace or placement that cannot be used as given."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None) -> None:
        self.source = source
        self.field = field
        self.detail = message
        super().__init__(self._render())

    def _render(self) -> str:
        where = ": ".join(part for part in (self.source, self.field) if part)
        text = f"{where}: {self.detail}" if where else self.detail
        return " ".join(text.split())  # always one line

    def at(self, *, source: str | None = None, field_prefix: str | None = None) -> "InputError":
        """Return a copy located in ``source``, with ``field_prefix`` prepended to the field."""
        field = self.field
        if field_prefix:
            field = f"{field_prefix}.{field}" if field else field_prefix
        return InputError(self.detail, source=source or self.source, field=field)
