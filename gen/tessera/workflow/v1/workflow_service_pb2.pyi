from buf.validate import validate_pb2 as _validate_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from tessera.common.v1 import auth_pb2 as _auth_pb2
from tessera.workflow.v1 import workflow_pb2 as _workflow_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ItemGrouping(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITEM_GROUPING_UNSPECIFIED: _ClassVar[ItemGrouping]
    ITEM_GROUPING_STATUS: _ClassVar[ItemGrouping]
    ITEM_GROUPING_ASSIGNEE: _ClassVar[ItemGrouping]
    ITEM_GROUPING_LABEL: _ClassVar[ItemGrouping]
ITEM_GROUPING_UNSPECIFIED: ItemGrouping
ITEM_GROUPING_STATUS: ItemGrouping
ITEM_GROUPING_ASSIGNEE: ItemGrouping
ITEM_GROUPING_LABEL: ItemGrouping

class CreateProjectRequest(_message.Message):
    __slots__ = ("parent", "project", "request_id")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    parent: str
    project: _workflow_pb2.Project
    request_id: str
    def __init__(self, parent: _Optional[str] = ..., project: _Optional[_Union[_workflow_pb2.Project, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateProjectResponse(_message.Message):
    __slots__ = ("project",)
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    project: _workflow_pb2.Project
    def __init__(self, project: _Optional[_Union[_workflow_pb2.Project, _Mapping]] = ...) -> None: ...

class GetProjectRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetProjectResponse(_message.Message):
    __slots__ = ("project",)
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    project: _workflow_pb2.Project
    def __init__(self, project: _Optional[_Union[_workflow_pb2.Project, _Mapping]] = ...) -> None: ...

class ListProjectsRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListProjectsResponse(_message.Message):
    __slots__ = ("projects", "next_page_token")
    PROJECTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    projects: _containers.RepeatedCompositeFieldContainer[_workflow_pb2.Project]
    next_page_token: str
    def __init__(self, projects: _Optional[_Iterable[_Union[_workflow_pb2.Project, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateProjectRequest(_message.Message):
    __slots__ = ("project", "update_mask", "etag")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    project: _workflow_pb2.Project
    update_mask: _field_mask_pb2.FieldMask
    etag: str
    def __init__(self, project: _Optional[_Union[_workflow_pb2.Project, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., etag: _Optional[str] = ...) -> None: ...

class UpdateProjectResponse(_message.Message):
    __slots__ = ("project",)
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    project: _workflow_pb2.Project
    def __init__(self, project: _Optional[_Union[_workflow_pb2.Project, _Mapping]] = ...) -> None: ...

class CreateItemRequest(_message.Message):
    __slots__ = ("parent", "item", "request_id")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    parent: str
    item: _workflow_pb2.Item
    request_id: str
    def __init__(self, parent: _Optional[str] = ..., item: _Optional[_Union[_workflow_pb2.Item, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateItemResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: _workflow_pb2.Item
    def __init__(self, item: _Optional[_Union[_workflow_pb2.Item, _Mapping]] = ...) -> None: ...

class GetItemRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetItemResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: _workflow_pb2.Item
    def __init__(self, item: _Optional[_Union[_workflow_pb2.Item, _Mapping]] = ...) -> None: ...

class UpdateItemRequest(_message.Message):
    __slots__ = ("item", "update_mask", "etag")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    item: _workflow_pb2.Item
    update_mask: _field_mask_pb2.FieldMask
    etag: str
    def __init__(self, item: _Optional[_Union[_workflow_pb2.Item, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., etag: _Optional[str] = ...) -> None: ...

class UpdateItemResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: _workflow_pb2.Item
    def __init__(self, item: _Optional[_Union[_workflow_pb2.Item, _Mapping]] = ...) -> None: ...

class TransitionItemRequest(_message.Message):
    __slots__ = ("name", "status", "etag")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    name: str
    status: str
    etag: str
    def __init__(self, name: _Optional[str] = ..., status: _Optional[str] = ..., etag: _Optional[str] = ...) -> None: ...

class TransitionItemResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: _workflow_pb2.Item
    def __init__(self, item: _Optional[_Union[_workflow_pb2.Item, _Mapping]] = ...) -> None: ...

class ArchiveItemRequest(_message.Message):
    __slots__ = ("name", "etag")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    name: str
    etag: str
    def __init__(self, name: _Optional[str] = ..., etag: _Optional[str] = ...) -> None: ...

class ArchiveItemResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: _workflow_pb2.Item
    def __init__(self, item: _Optional[_Union[_workflow_pb2.Item, _Mapping]] = ...) -> None: ...

class UnarchiveItemRequest(_message.Message):
    __slots__ = ("name", "etag")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    name: str
    etag: str
    def __init__(self, name: _Optional[str] = ..., etag: _Optional[str] = ...) -> None: ...

class UnarchiveItemResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: _workflow_pb2.Item
    def __init__(self, item: _Optional[_Union[_workflow_pb2.Item, _Mapping]] = ...) -> None: ...

class DeleteItemRequest(_message.Message):
    __slots__ = ("name", "etag")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    name: str
    etag: str
    def __init__(self, name: _Optional[str] = ..., etag: _Optional[str] = ...) -> None: ...

class DeleteItemResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: _workflow_pb2.Item
    def __init__(self, item: _Optional[_Union[_workflow_pb2.Item, _Mapping]] = ...) -> None: ...

class UndeleteItemRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UndeleteItemResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: _workflow_pb2.Item
    def __init__(self, item: _Optional[_Union[_workflow_pb2.Item, _Mapping]] = ...) -> None: ...

class BatchUpdateItemsRequest(_message.Message):
    __slots__ = ("parent", "requests")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    parent: str
    requests: _containers.RepeatedCompositeFieldContainer[UpdateItemRequest]
    def __init__(self, parent: _Optional[str] = ..., requests: _Optional[_Iterable[_Union[UpdateItemRequest, _Mapping]]] = ...) -> None: ...

class BatchUpdateItemsResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_workflow_pb2.Item]
    def __init__(self, items: _Optional[_Iterable[_Union[_workflow_pb2.Item, _Mapping]]] = ...) -> None: ...

class ListItemsRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token", "filter", "order_by", "search", "show_deleted", "show_archived")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_FIELD_NUMBER: _ClassVar[int]
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    SHOW_DELETED_FIELD_NUMBER: _ClassVar[int]
    SHOW_ARCHIVED_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    filter: str
    order_by: str
    search: str
    show_deleted: bool
    show_archived: bool
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ..., order_by: _Optional[str] = ..., search: _Optional[str] = ..., show_deleted: _Optional[bool] = ..., show_archived: _Optional[bool] = ...) -> None: ...

class ListItemsResponse(_message.Message):
    __slots__ = ("items", "next_page_token")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_workflow_pb2.Item]
    next_page_token: str
    def __init__(self, items: _Optional[_Iterable[_Union[_workflow_pb2.Item, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CountItemsRequest(_message.Message):
    __slots__ = ("parent", "filter", "search", "group_by", "show_archived")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    SHOW_ARCHIVED_FIELD_NUMBER: _ClassVar[int]
    parent: str
    filter: str
    search: str
    group_by: ItemGrouping
    show_archived: bool
    def __init__(self, parent: _Optional[str] = ..., filter: _Optional[str] = ..., search: _Optional[str] = ..., group_by: _Optional[_Union[ItemGrouping, str]] = ..., show_archived: _Optional[bool] = ...) -> None: ...

class ItemCount(_message.Message):
    __slots__ = ("key", "count")
    KEY_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    key: str
    count: int
    def __init__(self, key: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class CountItemsResponse(_message.Message):
    __slots__ = ("counts", "total")
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.RepeatedCompositeFieldContainer[ItemCount]
    total: int
    def __init__(self, counts: _Optional[_Iterable[_Union[ItemCount, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class ListItemActivitiesRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListItemActivitiesResponse(_message.Message):
    __slots__ = ("activities", "next_page_token")
    ACTIVITIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    activities: _containers.RepeatedCompositeFieldContainer[_workflow_pb2.Activity]
    next_page_token: str
    def __init__(self, activities: _Optional[_Iterable[_Union[_workflow_pb2.Activity, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
