"""Reading the files users give moesim: UTF-8 text, YAML and JSON, refused early when hostile or malformed.

Every reader here fails as one :class:`~moesim.errors.InputError` naming the file, the field (a dotted path
such as ``clusters[0].nodes``) or the line, and what was expected:

- a file must be a regular file (a folder, /dev/zero or a pipe is refused), its text UTF-8 (the first bad
  byte is named), and small enough that parsing it fits the memory limit (:mod:`moesim.budget`);
- YAML is composed into nodes first and checked before anything is built: nesting at most
  :data:`MAX_DEPTH` deep, at most :data:`MAX_ALIASES` aliases, which expand to at most
  :data:`MAX_ALIAS_NODES` extra nodes ("billion laughs") and never into themselves, no key given twice in
  one mapping (YAML would keep the last); a plain date stays text, ``1e-3`` is a number, and explicit tags
  that build other types (``!!binary``, ``!!set``) are refused;
- JSON: no key twice either, nesting bounded the same way;
- the values both give: numbers finite (no ``.nan``, ``NaN``, ``Infinity``), integers within 64 bits
  (numpy's), strings valid Unicode (no lone surrogates from ``\\ud800`` escapes).

:class:`NoBoolNumbers` is the base of the config models: ``true`` is not the number 1. Deliberately not
here: what the values mean (pydantic models and the format readers check that).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationInfo, field_validator

from moesim.errors import InputError

MAX_DEPTH = 64  # nesting of mappings and lists: configs use fewer than 10
MAX_ALIAS_NODES = 100_000  # nodes YAML aliases may add by repetition (a "billion laughs" adds 10^9)
MAX_ALIASES = 1_000  # alias references (*name) in one document: configs use a handful
INT64 = 2**63
YAML_BYTES_PER_BYTE = 64  # a composed node (its marks included) and its value, per byte of YAML text
JSON_BYTES_PER_BYTE = 24  # Python lists, dicts and numbers per byte of JSON text



class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]  # libyaml: 10x faster
    """The safe loader (libyaml's parser where installed: it also bounds flow nesting), except that a plain
    date stays text: ``name: 2024-06-01`` is a name, not a datetime."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


# YAML 1.1 wants a dot in a float (1.0e-3); 1e-3 would be text. Read it as the number it is (YAML 1.2, JSON).
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))


class _Dumper(yaml.SafeDumper):
    """The safe dumper, resolving plain scalars as :class:`_Loader` reads them: a string such as ``1e3`` is
    written quoted, so that it reads back as the string it was."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))


def dump_yaml(data: Any, **kwargs: Any) -> str:
    """``data`` as YAML text that :func:`load_yaml` reads back as the same values (``yaml.safe_dump``'s
    options, e.g. ``sort_keys=False``)."""
    return yaml.dump(data, Dumper=_Dumper, **kwargs)


_PLAIN = (dict, list, str, int, float, bool, type(None))  # what JSON can say; explicit YAML tags can say more


def require_regular_file(path: str | os.PathLike[str], source: str | None = None) -> int:
    """The size of ``path``, a regular file (a folder, a device such as /dev/zero that never ends, or a pipe
    that blocks is refused); a missing or unreadable one is an InputError too."""
    src = source or str(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputError("file not found", source=src) from None
    except (OSError, ValueError) as exc:  # (ValueError: a NUL byte in the path)
        raise InputError(f"cannot read ({getattr(exc, 'strerror', None) or exc})", source=src) from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError("not a regular file", source=src)
    return info.st_size


def read_bytes(path: str | os.PathLike[str], source: str | None = None, *, per_byte: float = 4) -> bytes:
    """A file's bytes; a missing or unreadable file, or one whose size times ``per_byte`` (the bytes what
    parses it will take per byte of file) exceeds the memory limit, is an InputError."""
    from moesim.budget import require_memory

    src = source or str(path)
    size = require_regular_file(path, src)
    require_memory(size * per_byte, f"reading and parsing a {size / 1e9:.2f} GB file", source=src)
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror or exc})", source=src) from None


def decode_utf8(raw: bytes, source: str | None) -> str:
    """``raw`` as UTF-8 text (a byte-order mark dropped); the first invalid byte is named."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line})",
                         source=source) from None


def read_text(path: str | os.PathLike[str], source: str | None = None, *, per_byte: float = 4) -> str:
    """A UTF-8 text file (see :func:`read_bytes` and :func:`decode_utf8`)."""
    src = source or str(path)
    return decode_utf8(read_bytes(path, src, per_byte=per_byte), src)


# ------------------------------------------------------------------------------------------------ YAML

def _child_path(path: str, node: yaml.Node, index: int) -> str:
    """The path of child ``index`` of ``node`` (a mapping's keys and values are its children 2i and 2i+1)."""
    if isinstance(node, yaml.SequenceNode):
        return f"{path}[{index}]"
    key = node.value[index // 2][0]
    text = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
    return f"{path}.{text}" if path else text


class _NodeWalk:
    """Depth, cycles, aliases, duplicate keys and lone surrogates of a composed document, walked without
    recursion; a node reached again through an alias is walked once. Scalars (nearly every node) are checked
    where their parent is expanded, and paths are spelt out only for an error."""

    def __init__(self, source: str | None) -> None:
        self.source = source
        self.done: dict[int, tuple[int, int]] = {}  # collection id -> (nodes it expands to, levels below it)
        self.on_path: set[int] = set()
        self.referenced: set[int] = set()  # every node some collection holds: a second reference is an alias
        self.aliases = 0
        self.distinct = 0  # nodes as written (a scalar alias counts as one more: close enough)

    def run(self, root: yaml.Node) -> None:
        if isinstance(root, yaml.ScalarNode):
            _check_string(root.value, self.source, "", root.start_mark.line + 1)
            return
        stack: list[tuple[yaml.Node, str, int, bool]] = [(root, "", 0, False)]
        while stack:
            node, path, depth, finished = stack.pop()
            children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
            if finished:
                self._finish(node, children)
            elif id(node) not in self.done:  # (else an alias of a node checked since it was queued)
                stack.append((node, path, depth, True))
                stack += self._expand(node, children, path, depth)
        extra = self.done[id(root)][0] - self.distinct
        if extra > MAX_ALIAS_NODES:
            raise InputError(f"aliases expand the document by more than {MAX_ALIAS_NODES} nodes (an alias bomb?); "
                             "write the repeated parts out", source=self.source)

    def _finish(self, node: yaml.Node, children: list[yaml.Node]) -> None:
        """Size and height of ``node``, aliases expanded, once its children are done."""
        self.on_path.discard(id(node))
        size, height = 1, 1
        for c in children:
            s, h = self.done.get(id(c), (1, 1))
            size, height = size + s, max(height, h + 1)
        if height > MAX_DEPTH:
            raise InputError(f"nested more than {MAX_DEPTH} levels deep once aliases are expanded (line "
                             f"{node.start_mark.line + 1})", source=self.source)
        self.done[id(node)] = (size, height)

    def _expand(self, node: yaml.Node, children: list[yaml.Node], path: str,
                depth: int) -> list[tuple[yaml.Node, str, int, bool]]:
        """Check ``node`` and its scalar children; return its collection children still to walk."""
        if depth > MAX_DEPTH:
            raise InputError(f"nested more than {MAX_DEPTH} levels deep (line {node.start_mark.line + 1})",
                             source=self.source)
        self.distinct += 1 + sum(isinstance(c, yaml.ScalarNode) for c in children)
        if isinstance(node, yaml.MappingNode):
            _check_duplicate_keys(node, self.source, path)
        self.on_path.add(id(node))
        todo = []
        for i, child in enumerate(children):
            self._count_reference(child)
            if isinstance(child, yaml.ScalarNode):
                if not child.value.isascii():
                    _check_string(child.value, self.source, _child_path(path, node, i), child.start_mark.line + 1)
            elif id(child) in self.on_path:
                raise InputError(f"an alias refers to a node that contains it (line {child.start_mark.line + 1})",
                                 source=self.source, field=_child_path(path, node, i))
            elif id(child) not in self.done:
                todo.append((child, _child_path(path, node, i), depth + 1, False))
        return todo

    def _count_reference(self, child: yaml.Node) -> None:
        if id(child) not in self.referenced:
            self.referenced.add(id(child))
            return
        self.aliases += 1
        if self.aliases > MAX_ALIASES:
            raise InputError(f"more than {MAX_ALIASES} alias references (line {child.start_mark.line + 1}); write "
                             "the repeated parts out", source=self.source)


def _check_duplicate_keys(node: yaml.MappingNode, source: str | None, path: str) -> None:
    seen: dict[tuple[str, str], int] = {}
    for k, _ in node.value:
        if not isinstance(k, yaml.ScalarNode) or k.tag == "tag:yaml.org,2002:merge":
            continue
        line = k.start_mark.line + 1
        ident = (k.tag, k.value)
        if ident in seen:
            field = f"{path}.{k.value}" if path else str(k.value)
            raise InputError(f"duplicate key at line {line} (first at line {seen[ident]}); YAML would keep only the "
                             "last: give each key once", source=source, field=field)
        seen[ident] = line


def _check_string(text: str, source: str | None, path: str, line: int | None = None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = f" (line {line})" if line is not None else ""
        raise InputError(f"holds a lone surrogate {text[exc.start]!a}, not a valid Unicode character{where}",
                         source=source, field=path or None) from None


def load_yaml(text: str, source: str | None) -> Any:
    """Parse YAML ``text`` (one document; empty text is None) with the checks of the module docstring."""
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _NodeWalk(source).run(node)
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except InputError:
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise InputError(f"malformed YAML: {problem}", source=source, field=where) from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits
        text = " ".join(str(exc).split())
        if "integer string conversion" in text:
            text = f"an integer of more than {sys.get_int_max_str_digits()} digits"
        raise InputError(f"malformed YAML: {text[:200]}", source=source) from None
    check_values(data, source)
    return data


def read_yaml(path: str | os.PathLike[str], source: str | None = None) -> Any:
    """A YAML file, read and parsed with every check here."""
    src = source or str(path)
    return load_yaml(read_text(path, src, per_byte=YAML_BYTES_PER_BYTE), src)


# ------------------------------------------------------------------------------------------------ JSON

def unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; ValueError on a key given twice (``json.loads(object_pairs_hook=)``)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r} (JSON would keep only the last)")
        out[k] = v
    return out


def load_json(text: str, source: str | None) -> Any:
    """Parse JSON ``text`` with the checks of the module docstring."""
    try:
        data = json.loads(text, object_pairs_hook=unique_pairs)  # NaN and Infinity: refused below, by path
    except RecursionError:
        raise InputError("not valid JSON (nested too deeply)", source=source) from None
    except ValueError as exc:  # json.JSONDecodeError, and the hooks' errors
        text = " ".join(str(exc).split())
        if "integer string conversion" in text:
            text = f"an integer of more than {sys.get_int_max_str_digits()} digits"
        raise InputError(f"not valid JSON ({text[:200]})", source=source) from None
    check_values(data, source)
    return data


def read_json(path: str | os.PathLike[str], source: str | None = None) -> Any:
    """A JSON file, read and parsed with every check here."""
    src = source or str(path)
    return load_json(read_text(path, src, per_byte=JSON_BYTES_PER_BYTE), src)


# ------------------------------------------------------------------------------------------------ values

def check_values(data: Any, source: str | None, prefix: str = "", *, plain: bool = True) -> None:
    """Numbers finite, integers within 64 bits, strings valid Unicode, nesting at most :data:`MAX_DEPTH`,
    anywhere in ``data`` (plain data as YAML or JSON loads it: with ``plain``, nothing but mappings, lists,
    text, numbers, booleans and null); the first bad value is an InputError naming its path."""
    seen: set[int] = set()
    stack: list[tuple[Any, str, int]] = [(data, prefix, 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list)) or (not plain and isinstance(value, tuple)):
            if id(value) in seen:
                continue
            seen.add(id(value))
            if depth > MAX_DEPTH:
                raise InputError(f"nested more than {MAX_DEPTH} levels deep", source=source)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                if isinstance(value, dict):
                    check_values(k, source, path, plain=plain)  # keys are values too
                    child = f"{path}.{k}" if path else str(k)
                else:
                    child = f"{path}[{k}]"
                stack.append((v, child, depth + 1))
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if not -INT64 <= value < INT64:
                raise InputError(f"an integer of {value.bit_length()} bits does not fit in 64 bits", source=source,
                                 field=path or None)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InputError(f"must be a finite number, got {value}", source=source, field=path or None)
        elif isinstance(value, str):
            _check_string(value, source, path)
        elif plain and not isinstance(value, _PLAIN):  # !!binary, !!timestamp, !!set, !!omap ...
            raise InputError(f"a {type(value).__name__} value (an explicit YAML tag?); expected text, a number, a "
                             "list or a mapping", source=source, field=path or None)


class NoBoolNumbers(BaseModel):
    """A base for config models: ``true`` and ``false`` are not numbers (pydantic would read them as 1 and
    0, so ``nodes: true`` would pass as one node)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            annotation = cls.model_fields[info.field_name].annotation
            kinds = {annotation, *typing.get_args(annotation)}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"must be a number, not {str(value).lower()}")
        return value

