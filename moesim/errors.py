"""Errors that moesim reports to users.

Every problem with user input is raised as :class:`InputError`, which renders as one line naming the
file (when there is one), the field and what was expected. The CLI turns it into exit code 2.
"""

from __future__ import annotations


_MAX_DETAIL = 600  # characters of the message kept (a repr of a huge value is cut)


class InputError(ValueError):
    """Bad user input: a scenario, cluster, trace or placement that cannot be used as given."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None) -> None:
        self.source = source
        self.field = field
        self.detail = message
        super().__init__(self._render())

    def _render(self) -> str:
        where = ": ".join(part for part in (self.source, self.field) if part)
        detail = self.detail if len(self.detail) <= _MAX_DETAIL else self.detail[:_MAX_DETAIL] + "..."
        text = f"{where}: {detail}" if where else detail
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates (odd file names) escaped
        return " ".join(text.split())  # always one line

    def at(self, *, source: str | None = None, field_prefix: str | None = None) -> "InputError":
        """Return a copy located in ``source`` (unless it already names its file), with ``field_prefix``
        prepended to the field."""
        field = self.field
        if field_prefix:
            field = f"{field_prefix}.{field}" if field else field_prefix
        return InputError(self.detail, source=self.source or source, field=field)

    def via(self, source: str | None, field: str) -> "InputError":
        """This error, raised reading a file that ``source`` names at ``field``, saying so: the line names both
        the file holding the bad value and the one that asked for it."""
        return InputError(f"{self.detail} (read as {field} of {source})", source=self.source or source,
                          field=self.field if self.source else field)
