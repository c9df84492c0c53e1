"""The unit handlers exchange: columnar rows plus metadata plus an ack handle."""
from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import pyarrow as pa

from .acks import AckNode

__all__ = ["Batch", "Data", "to_arrow"]

#: What ``emit`` and a processor's return value accept.
Data: TypeAlias = "pa.RecordBatch | pa.Table | Batch | Sequence[Mapping[str, Any]]"

_EMPTY: Mapping[str, Any] = types.MappingProxyType({})


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Batch:
    """Rows (a ``pyarrow.RecordBatch`` or ``Table``) and where they came from.

    ``source``
        name of the handler instance that emitted this batch.
    ``key``
        name of the column holding each row's deterministic id or key, if any.
    ``meta``
        read-only free-form metadata (topic, partition, recording, ...); a
        derived batch inherits its parent's metadata unless it overrides keys.
    ``created``
        ``time.monotonic()`` when the originating upstream message was read.

    A batch is immutable and may be shared by several consumers (fan-out).
    Its acknowledgement is managed by the runtime: returning normally from
    ``process``/``write`` commits it, raising fails it, ``Handler.defer``
    postpones the commit.
    """

    data: pa.RecordBatch | pa.Table
    source: str = ""
    key: str | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=lambda: _EMPTY)
    created: float = 0.0
    _ack: AckNode | None = dataclasses.field(default=None, repr=False)

    @property
    def num_rows(self) -> int:
        return self.data.num_rows

    def __len__(self) -> int:
        return self.data.num_rows

    @property
    def schema(self) -> pa.Schema:
        return self.data.schema

    def keys(self) -> list[Any]:
        """The ``key`` column as Python values (row positions when there is no key)."""
        if self.key is None or self.key not in self.data.schema.names:
            return list(range(self.data.num_rows))
        return self.data.column(self.key).to_pylist()

    def take(self, rows: Sequence[int] | pa.Array) -> Batch:
        """The given row positions, same metadata and same acknowledgement."""
        indices = rows if isinstance(rows, pa.Array) else pa.array(rows, type=pa.int64())
        return dataclasses.replace(self, data=self.data.take(indices))

    def filter(self, mask: Sequence[bool] | pa.Array) -> Batch:
        """Rows where ``mask`` is true, same metadata and same acknowledgement."""
        arr = mask if isinstance(mask, pa.Array) else pa.array(mask, type=pa.bool_())
        return dataclasses.replace(self, data=self.data.filter(arr))

    def to_pylist(self) -> list[dict[str, Any]]:
        return self.data.to_pylist()

    def to_table(self) -> pa.Table:
        if isinstance(self.data, pa.Table):
            return self.data
        return pa.Table.from_batches([self.data])


def to_arrow(data: Any) -> pa.RecordBatch | pa.Table:
    """Accept the shapes handlers naturally produce; reject anything else loudly."""
    if isinstance(data, (pa.RecordBatch, pa.Table)):
        return data
    if isinstance(data, Batch):
        return data.data
    if isinstance(data, Mapping):
        return pa.table(dict(data))
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        return pa.Table.from_pylist(list(data))
    raise TypeError(
        "expected a pyarrow.RecordBatch, a pyarrow.Table, a Batch, a mapping of columns "
        f"or a list of row dicts; got {type(data).__name__}"
    )
