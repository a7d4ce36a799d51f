import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tessera.identity.v1 import identity_pb2 as _identity_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UserSignedUpEvent(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: _identity_pb2.User
    def __init__(self, user: _Optional[_Union[_identity_pb2.User, _Mapping]] = ...) -> None: ...

class MailRequestedEvent(_message.Message):
    __slots__ = ("to", "template", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TO_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    to: str
    template: str
    params: _containers.ScalarMap[str, str]
    def __init__(self, to: _Optional[str] = ..., template: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SessionsRevokedEvent(_message.Message):
    __slots__ = ("user", "session_ids", "reason", "revoke_time")
    USER_FIELD_NUMBER: _ClassVar[int]
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REVOKE_TIME_FIELD_NUMBER: _ClassVar[int]
    user: str
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    revoke_time: _timestamp_pb2.Timestamp
    def __init__(self, user: _Optional[str] = ..., session_ids: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ..., revoke_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ApiKeyRevokedEvent(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: _identity_pb2.ApiKey
    def __init__(self, api_key: _Optional[_Union[_identity_pb2.ApiKey, _Mapping]] = ...) -> None: ...
