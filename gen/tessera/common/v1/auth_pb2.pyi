from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuthLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUTH_LEVEL_UNSPECIFIED: _ClassVar[AuthLevel]
    AUTH_LEVEL_PUBLIC: _ClassVar[AuthLevel]
    AUTH_LEVEL_USER: _ClassVar[AuthLevel]
    AUTH_LEVEL_WORKSPACE: _ClassVar[AuthLevel]
AUTH_LEVEL_UNSPECIFIED: AuthLevel
AUTH_LEVEL_PUBLIC: AuthLevel
AUTH_LEVEL_USER: AuthLevel
AUTH_LEVEL_WORKSPACE: AuthLevel
AUTH_FIELD_NUMBER: _ClassVar[int]
auth: _descriptor.FieldDescriptor

class AuthRule(_message.Message):
    __slots__ = ("level", "permission")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_FIELD_NUMBER: _ClassVar[int]
    level: AuthLevel
    permission: str
    def __init__(self, level: _Optional[_Union[AuthLevel, str]] = ..., permission: _Optional[str] = ...) -> None: ...
