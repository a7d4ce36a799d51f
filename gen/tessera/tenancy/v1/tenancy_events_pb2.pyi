from tessera.tenancy.v1 import tenancy_pb2 as _tenancy_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkspaceCreatedEvent(_message.Message):
    __slots__ = ("workspace",)
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    workspace: _tenancy_pb2.Workspace
    def __init__(self, workspace: _Optional[_Union[_tenancy_pb2.Workspace, _Mapping]] = ...) -> None: ...

class WorkspaceProvisionedEvent(_message.Message):
    __slots__ = ("workspace",)
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    workspace: _tenancy_pb2.Workspace
    def __init__(self, workspace: _Optional[_Union[_tenancy_pb2.Workspace, _Mapping]] = ...) -> None: ...
