from runtimed.api.containerd.services.images.v1 import images_pb2 as _images_pb2
from runtimed.api.containerd.types import platform_pb2 as _platform_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegistryOptions(_message.Message):
    __slots__ = ("plain_http", "username", "secret", "skip_verify")
    PLAIN_HTTP_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    SKIP_VERIFY_FIELD_NUMBER: _ClassVar[int]
    plain_http: bool
    username: str
    secret: str
    skip_verify: bool
    def __init__(self, plain_http: _Optional[bool] = ..., username: _Optional[str] = ..., secret: _Optional[str] = ..., skip_verify: _Optional[bool] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("reference", "platforms", "all_platforms", "unpack", "snapshotter", "registry", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    ALL_PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    UNPACK_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTTER_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    reference: str
    platforms: _containers.RepeatedCompositeFieldContainer[_platform_pb2.Platform]
    all_platforms: bool
    unpack: bool
    snapshotter: str
    registry: RegistryOptions
    labels: _containers.ScalarMap[str, str]
    def __init__(self, reference: _Optional[str] = ..., platforms: _Optional[_Iterable[_Union[_platform_pb2.Platform, _Mapping]]] = ..., all_platforms: _Optional[bool] = ..., unpack: _Optional[bool] = ..., snapshotter: _Optional[str] = ..., registry: _Optional[_Union[RegistryOptions, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("reference", "remote", "platforms", "registry")
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    reference: str
    remote: str
    platforms: _containers.RepeatedCompositeFieldContainer[_platform_pb2.Platform]
    registry: RegistryOptions
    def __init__(self, reference: _Optional[str] = ..., remote: _Optional[str] = ..., platforms: _Optional[_Iterable[_Union[_platform_pb2.Platform, _Mapping]]] = ..., registry: _Optional[_Union[RegistryOptions, _Mapping]] = ...) -> None: ...

class ImportOptions(_message.Message):
    __slots__ = ("base_name", "unpack", "snapshotter", "platforms", "all_platforms", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BASE_NAME_FIELD_NUMBER: _ClassVar[int]
    UNPACK_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTTER_FIELD_NUMBER: _ClassVar[int]
    PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    ALL_PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    base_name: str
    unpack: bool
    snapshotter: str
    platforms: _containers.RepeatedCompositeFieldContainer[_platform_pb2.Platform]
    all_platforms: bool
    labels: _containers.ScalarMap[str, str]
    def __init__(self, base_name: _Optional[str] = ..., unpack: _Optional[bool] = ..., snapshotter: _Optional[str] = ..., platforms: _Optional[_Iterable[_Union[_platform_pb2.Platform, _Mapping]]] = ..., all_platforms: _Optional[bool] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ImportRequest(_message.Message):
    __slots__ = ("options", "data")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    options: ImportOptions
    data: bytes
    def __init__(self, options: _Optional[_Union[ImportOptions, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("names", "platforms", "all_platforms")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    ALL_PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    platforms: _containers.RepeatedCompositeFieldContainer[_platform_pb2.Platform]
    all_platforms: bool
    def __init__(self, names: _Optional[_Iterable[str]] = ..., platforms: _Optional[_Iterable[_Union[_platform_pb2.Platform, _Mapping]]] = ..., all_platforms: _Optional[bool] = ...) -> None: ...

class ExportResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("event", "name", "media_type", "offset", "total", "image", "message")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    event: str
    name: str
    media_type: str
    offset: int
    total: int
    image: _images_pb2.Image
    message: str
    def __init__(self, event: _Optional[str] = ..., name: _Optional[str] = ..., media_type: _Optional[str] = ..., offset: _Optional[int] = ..., total: _Optional[int] = ..., image: _Optional[_Union[_images_pb2.Image, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...
