import datetime

from buf.validate import validate_pb2 as _validate_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StateCategory(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_CATEGORY_UNSPECIFIED: _ClassVar[StateCategory]
    STATE_CATEGORY_BACKLOG: _ClassVar[StateCategory]
    STATE_CATEGORY_ACTIVE: _ClassVar[StateCategory]
    STATE_CATEGORY_DONE: _ClassVar[StateCategory]
    STATE_CATEGORY_CANCELLED: _ClassVar[StateCategory]

class TransitionGuard(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSITION_GUARD_UNSPECIFIED: _ClassVar[TransitionGuard]
    TRANSITION_GUARD_ASSIGNEE_REQUIRED: _ClassVar[TransitionGuard]
    TRANSITION_GUARD_SUBITEMS_CLOSED: _ClassVar[TransitionGuard]

class CustomFieldType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CUSTOM_FIELD_TYPE_UNSPECIFIED: _ClassVar[CustomFieldType]
    CUSTOM_FIELD_TYPE_STRING: _ClassVar[CustomFieldType]
    CUSTOM_FIELD_TYPE_NUMBER: _ClassVar[CustomFieldType]
    CUSTOM_FIELD_TYPE_BOOLEAN: _ClassVar[CustomFieldType]
    CUSTOM_FIELD_TYPE_TIMESTAMP: _ClassVar[CustomFieldType]
    CUSTOM_FIELD_TYPE_ENUM: _ClassVar[CustomFieldType]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_LOW: _ClassVar[Priority]
    PRIORITY_MEDIUM: _ClassVar[Priority]
    PRIORITY_HIGH: _ClassVar[Priority]
    PRIORITY_URGENT: _ClassVar[Priority]

class ActivityKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTIVITY_KIND_UNSPECIFIED: _ClassVar[ActivityKind]
    ACTIVITY_KIND_CREATED: _ClassVar[ActivityKind]
    ACTIVITY_KIND_UPDATED: _ClassVar[ActivityKind]
    ACTIVITY_KIND_TRANSITIONED: _ClassVar[ActivityKind]
    ACTIVITY_KIND_ARCHIVED: _ClassVar[ActivityKind]
    ACTIVITY_KIND_UNARCHIVED: _ClassVar[ActivityKind]
    ACTIVITY_KIND_DELETED: _ClassVar[ActivityKind]
    ACTIVITY_KIND_UNDELETED: _ClassVar[ActivityKind]
STATE_CATEGORY_UNSPECIFIED: StateCategory
STATE_CATEGORY_BACKLOG: StateCategory
STATE_CATEGORY_ACTIVE: StateCategory
STATE_CATEGORY_DONE: StateCategory
STATE_CATEGORY_CANCELLED: StateCategory
TRANSITION_GUARD_UNSPECIFIED: TransitionGuard
TRANSITION_GUARD_ASSIGNEE_REQUIRED: TransitionGuard
TRANSITION_GUARD_SUBITEMS_CLOSED: TransitionGuard
CUSTOM_FIELD_TYPE_UNSPECIFIED: CustomFieldType
CUSTOM_FIELD_TYPE_STRING: CustomFieldType
CUSTOM_FIELD_TYPE_NUMBER: CustomFieldType
CUSTOM_FIELD_TYPE_BOOLEAN: CustomFieldType
CUSTOM_FIELD_TYPE_TIMESTAMP: CustomFieldType
CUSTOM_FIELD_TYPE_ENUM: CustomFieldType
PRIORITY_UNSPECIFIED: Priority
PRIORITY_LOW: Priority
PRIORITY_MEDIUM: Priority
PRIORITY_HIGH: Priority
PRIORITY_URGENT: Priority
ACTIVITY_KIND_UNSPECIFIED: ActivityKind
ACTIVITY_KIND_CREATED: ActivityKind
ACTIVITY_KIND_UPDATED: ActivityKind
ACTIVITY_KIND_TRANSITIONED: ActivityKind
ACTIVITY_KIND_ARCHIVED: ActivityKind
ACTIVITY_KIND_UNARCHIVED: ActivityKind
ACTIVITY_KIND_DELETED: ActivityKind
ACTIVITY_KIND_UNDELETED: ActivityKind

class Project(_message.Message):
    __slots__ = ("name", "display_name", "description", "workflow", "custom_fields", "creator", "create_time", "update_time", "etag")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_FIELDS_FIELD_NUMBER: _ClassVar[int]
    CREATOR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    description: str
    workflow: Workflow
    custom_fields: _containers.RepeatedCompositeFieldContainer[CustomFieldDefinition]
    creator: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    etag: str
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., description: _Optional[str] = ..., workflow: _Optional[_Union[Workflow, _Mapping]] = ..., custom_fields: _Optional[_Iterable[_Union[CustomFieldDefinition, _Mapping]]] = ..., creator: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., etag: _Optional[str] = ...) -> None: ...

class Workflow(_message.Message):
    __slots__ = ("states", "transitions", "initial_state")
    STATES_FIELD_NUMBER: _ClassVar[int]
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_STATE_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedCompositeFieldContainer[WorkflowState]
    transitions: _containers.RepeatedCompositeFieldContainer[Transition]
    initial_state: str
    def __init__(self, states: _Optional[_Iterable[_Union[WorkflowState, _Mapping]]] = ..., transitions: _Optional[_Iterable[_Union[Transition, _Mapping]]] = ..., initial_state: _Optional[str] = ...) -> None: ...

class WorkflowState(_message.Message):
    __slots__ = ("id", "display_name", "category")
    ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    id: str
    display_name: str
    category: StateCategory
    def __init__(self, id: _Optional[str] = ..., display_name: _Optional[str] = ..., category: _Optional[_Union[StateCategory, str]] = ...) -> None: ...

class Transition(_message.Message):
    __slots__ = ("from_state", "to_state", "guards")
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    GUARDS_FIELD_NUMBER: _ClassVar[int]
    from_state: str
    to_state: str
    guards: _containers.RepeatedScalarFieldContainer[TransitionGuard]
    def __init__(self, from_state: _Optional[str] = ..., to_state: _Optional[str] = ..., guards: _Optional[_Iterable[_Union[TransitionGuard, str]]] = ...) -> None: ...

class CustomFieldDefinition(_message.Message):
    __slots__ = ("key", "display_name", "type", "allowed_values")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_VALUES_FIELD_NUMBER: _ClassVar[int]
    key: str
    display_name: str
    type: CustomFieldType
    allowed_values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., display_name: _Optional[str] = ..., type: _Optional[_Union[CustomFieldType, str]] = ..., allowed_values: _Optional[_Iterable[str]] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("name", "title", "description", "status", "priority", "assignee", "labels", "due_time", "custom_fields", "parent", "archived", "creator", "updater", "create_time", "update_time", "archive_time", "delete_time", "etag")
    class CustomFieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ASSIGNEE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DUE_TIME_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_FIELDS_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    ARCHIVED_FIELD_NUMBER: _ClassVar[int]
    CREATOR_FIELD_NUMBER: _ClassVar[int]
    UPDATER_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ARCHIVE_TIME_FIELD_NUMBER: _ClassVar[int]
    DELETE_TIME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    name: str
    title: str
    description: str
    status: str
    priority: Priority
    assignee: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    due_time: _timestamp_pb2.Timestamp
    custom_fields: _containers.MessageMap[str, _struct_pb2.Value]
    parent: str
    archived: bool
    creator: str
    updater: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    archive_time: _timestamp_pb2.Timestamp
    delete_time: _timestamp_pb2.Timestamp
    etag: str
    def __init__(self, name: _Optional[str] = ..., title: _Optional[str] = ..., description: _Optional[str] = ..., status: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ..., assignee: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., due_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., custom_fields: _Optional[_Mapping[str, _struct_pb2.Value]] = ..., parent: _Optional[str] = ..., archived: _Optional[bool] = ..., creator: _Optional[str] = ..., updater: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., archive_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., delete_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., etag: _Optional[str] = ...) -> None: ...

class Activity(_message.Message):
    __slots__ = ("name", "kind", "field", "before", "after", "actor", "create_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ActivityKind
    field: str
    before: _struct_pb2.Value
    after: _struct_pb2.Value
    actor: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ActivityKind, str]] = ..., field: _Optional[str] = ..., before: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., after: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., actor: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
