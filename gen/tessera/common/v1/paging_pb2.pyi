from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PageCursor(_message.Message):
    __slots__ = ("last_values", "query_hash", "issued_to")
    LAST_VALUES_FIELD_NUMBER: _ClassVar[int]
    QUERY_HASH_FIELD_NUMBER: _ClassVar[int]
    ISSUED_TO_FIELD_NUMBER: _ClassVar[int]
    last_values: _containers.RepeatedScalarFieldContainer[str]
    query_hash: bytes
    issued_to: str
    def __init__(self, last_values: _Optional[_Iterable[str]] = ..., query_hash: _Optional[bytes] = ..., issued_to: _Optional[str] = ...) -> None: ...
