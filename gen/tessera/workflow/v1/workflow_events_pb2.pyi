from tessera.workflow.v1 import workflow_pb2 as _workflow_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProjectCreatedEvent(_message.Message):
    __slots__ = ("project",)
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    project: _workflow_pb2.Project
    def __init__(self, project: _Optional[_Union[_workflow_pb2.Project, _Mapping]] = ...) -> None: ...

class ProjectUpdatedEvent(_message.Message):
    __slots__ = ("project", "changed_fields")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    project: _workflow_pb2.Project
    changed_fields: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, project: _Optional[_Union[_workflow_pb2.Project, _Mapping]] = ..., changed_fields: _Optional[_Iterable[str]] = ...) -> None: ...

class ItemCreatedEvent(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: _workflow_pb2.Item
    def __init__(self, item: _Optional[_Union[_workflow_pb2.Item, _Mapping]] = ...) -> None: ...

class ItemUpdatedEvent(_message.Message):
    __slots__ = ("item", "changed_fields")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    item: _workflow_pb2.Item
    changed_fields: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item: _Optional[_Union[_workflow_pb2.Item, _Mapping]] = ..., changed_fields: _Optional[_Iterable[str]] = ...) -> None: ...

class ItemTransitionedEvent(_message.Message):
    __slots__ = ("item", "from_status", "to_status")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    FROM_STATUS_FIELD_NUMBER: _ClassVar[int]
    TO_STATUS_FIELD_NUMBER: _ClassVar[int]
    item: _workflow_pb2.Item
    from_status: str
    to_status: str
    def __init__(self, item: _Optional[_Union[_workflow_pb2.Item, _Mapping]] = ..., from_status: _Optional[str] = ..., to_status: _Optional[str] = ...) -> None: ...

class ItemArchivedEvent(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: _workflow_pb2.Item
    def __init__(self, item: _Optional[_Union[_workflow_pb2.Item, _Mapping]] = ...) -> None: ...

class ItemUnarchivedEvent(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: _workflow_pb2.Item
    def __init__(self, item: _Optional[_Union[_workflow_pb2.Item, _Mapping]] = ...) -> None: ...

class ItemDeletedEvent(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: _workflow_pb2.Item
    def __init__(self, item: _Optional[_Union[_workflow_pb2.Item, _Mapping]] = ...) -> None: ...

class ItemUndeletedEvent(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: _workflow_pb2.Item
    def __init__(self, item: _Optional[_Union[_workflow_pb2.Item, _Mapping]] = ...) -> None: ...
