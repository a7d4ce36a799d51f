import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
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

class WorkspaceDeletedEvent(_message.Message):
    __slots__ = ("workspace",)
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    workspace: _tenancy_pb2.Workspace
    def __init__(self, workspace: _Optional[_Union[_tenancy_pb2.Workspace, _Mapping]] = ...) -> None: ...

class WorkspaceUndeletedEvent(_message.Message):
    __slots__ = ("workspace",)
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    workspace: _tenancy_pb2.Workspace
    def __init__(self, workspace: _Optional[_Union[_tenancy_pb2.Workspace, _Mapping]] = ...) -> None: ...

class MembershipChangedEvent(_message.Message):
    __slots__ = ("member", "previous_role", "role", "change_time")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_ROLE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CHANGE_TIME_FIELD_NUMBER: _ClassVar[int]
    member: str
    previous_role: str
    role: str
    change_time: _timestamp_pb2.Timestamp
    def __init__(self, member: _Optional[str] = ..., previous_role: _Optional[str] = ..., role: _Optional[str] = ..., change_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class InvitationCreatedEvent(_message.Message):
    __slots__ = ("invitation", "token", "workspace_display_name")
    INVITATION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    invitation: _tenancy_pb2.Invitation
    token: str
    workspace_display_name: str
    def __init__(self, invitation: _Optional[_Union[_tenancy_pb2.Invitation, _Mapping]] = ..., token: _Optional[str] = ..., workspace_display_name: _Optional[str] = ...) -> None: ...
