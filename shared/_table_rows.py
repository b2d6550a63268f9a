"""Table rows as plain Python values, and their JSON form on the wire (no SDK, no I/O).

Property types: https://learn.microsoft.com/rest/api/storageservices/payload-format-for-table-service-operations
— strings, booleans and 32-bit integers go as plain JSON values; other types carry an
``<name>@odata.type`` annotation (``Edm.Int64`` as a string, ``Edm.Double`` specials as strings,
``Edm.Binary`` as base64).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping

# A value a row holds (https://learn.microsoft.com/rest/api/storageservices/understanding-the-table-service-data-model).
EntityValue = str | int | float | bool | bytes | None
_INT32 = range(-(2**31), 2**31)


class Row(dict[str, EntityValue]):
    """A table row as read: its properties, and the ETag it was read at (optimistic concurrency)."""

    __slots__ = ("etag",)

    def __init__(self, properties: Mapping[str, EntityValue], etag: str | None) -> None:
        super().__init__(properties)
        self.etag = etag


def entity_to_json(entity: Mapping[str, EntityValue]) -> dict[str, object]:
    """Properties as the Table service reads them; ``None`` values are left out (as the SDK does)."""
    out: dict[str, object] = {}
    for name, value in entity.items():
        if value is None:
            continue
        if isinstance(value, (bool, str)):
            out[name] = value
        elif isinstance(value, int):
            if value in _INT32:
                out[name] = value
            else:
                out[name], out[f"{name}@odata.type"] = str(value), "Edm.Int64"
        elif isinstance(value, float):
            out[name] = value if math.isfinite(value) else \
                ("NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity"))
            out[f"{name}@odata.type"] = "Edm.Double"
        elif isinstance(value, bytes):
            out[name], out[f"{name}@odata.type"] = base64.b64encode(value).decode(), "Edm.Binary"
        else:
            raise TypeError(f"Table property {name!r} has an unsupported type: {type(value).__name__}.")
    return out


def row_from_json(body: Mapping[str, object]) -> Row:
    """A row from the service's JSON (minimal metadata): typed values, ``odata.*`` and ``Timestamp``
    left out, the ETag kept."""
    props: dict[str, EntityValue] = {}
    types: dict[str, str] = {}
    for name, value in body.items():
        if name.endswith("@odata.type"):
            types[name[:-11]] = str(value)
        elif not name.startswith("odata.") and name != "Timestamp":
            props[name] = _json_value(name, value)
    for name, edm in types.items():
        if name in props:
            props[name] = from_edm(edm, props[name])
    etag = body.get("odata.etag")
    return Row(props, etag if isinstance(etag, str) else None)


def _json_value(name: str, value: object) -> EntityValue:
    """A property as the service's JSON carries it: a string, number, boolean or null."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"Table property {name!r} has an unexpected JSON value: {type(value).__name__}.")


def from_edm(edm: str, value: object) -> EntityValue:
    """A typed JSON value as Python (Edm.DateTime and Edm.Guid stay strings: we write neither)."""
    if edm == "Edm.Int64":
        return int(str(value))
    if edm == "Edm.Double":
        return float(str(value))  # a number, or "NaN" / "Infinity" / "-Infinity"
    if edm == "Edm.Binary":
        return base64.b64decode(str(value))
    return value if isinstance(value, (str, int, float, bool)) else str(value)
