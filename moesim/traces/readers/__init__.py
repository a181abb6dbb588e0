"""Turn routing logs into moesim traces: per-layer CSV rows, JSONL per-token records, raw numpy arrays.

Each input record says which experts one token of one request picked at one MoE layer (optionally with gate
weights). A reader (one module per format: :mod:`~moesim.traces.readers.csv_reader`,
:mod:`~moesim.traces.readers.jsonl_reader`, :mod:`~moesim.traces.readers.numpy_reader`) turns one file into
a :class:`~moesim.traces.readers.records.RoutingRecords`; the table :data:`~moesim.traces.readers.table.READERS`
maps format names (and file suffixes) to readers; :mod:`~moesim.traces.readers.assemble` checks the records
of all files together and builds the :class:`~moesim.traces.format.Trace`, packing requests into batches and
home GPUs (:func:`import_trace`, :func:`pack_requests`). Each module's docstring says what its layout
accepts and what it ignores.
"""

from moesim.traces.readers.assemble import ASSIGN_POLICIES, ImportResult, import_trace, pack_requests, pack_tokens
from moesim.traces.readers.records import ReadOptions, RoutingRecords
from moesim.traces.readers.table import READERS, Reader, detect_format

__all__ = ["ASSIGN_POLICIES", "READERS", "ImportResult", "ReadOptions", "Reader", "RoutingRecords", "detect_format",
           "import_trace", "pack_requests", "pack_tokens"]
