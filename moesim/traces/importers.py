"""Kept so that ``moesim.traces.importers`` still imports: the trace readers now live in
:mod:`moesim.traces.readers` (one module per format, a table of readers, and the assembly into a trace)."""

from moesim.traces.readers import ASSIGN_POLICIES, ImportResult, import_trace, pack_requests

__all__ = ["ASSIGN_POLICIES", "ImportResult", "import_trace", "pack_requests"]
