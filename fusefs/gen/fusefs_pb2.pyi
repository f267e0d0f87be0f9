from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PodInfo(_message.Message):
    __slots__ = ("namespace", "name", "uid", "claim")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    uid: str
    claim: str
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., uid: _Optional[str] = ..., claim: _Optional[str] = ...) -> None: ...

class IOLimits(_message.Message):
    __slots__ = ("bytes_per_second", "ops_per_second")
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    OPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    bytes_per_second: int
    ops_per_second: int
    def __init__(self, bytes_per_second: _Optional[int] = ..., ops_per_second: _Optional[int] = ...) -> None: ...

class Health(_message.Message):
    __slots__ = ("healthy", "message")
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    message: str
    def __init__(self, healthy: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class Publication(_message.Message):
    __slots__ = ("target_path", "read_only", "pod")
    TARGET_PATH_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    target_path: str
    read_only: bool
    pod: PodInfo
    def __init__(self, target_path: _Optional[str] = ..., read_only: _Optional[bool] = ..., pod: _Optional[_Union[PodInfo, _Mapping]] = ...) -> None: ...

class Volume(_message.Message):
    __slots__ = ("volume_id", "staging_path", "capacity_bytes", "read_only", "limits", "publications", "state", "health", "remount_count", "pid")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    STAGING_PATH_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    PUBLICATIONS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    REMOUNT_COUNT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    staging_path: str
    capacity_bytes: int
    read_only: bool
    limits: IOLimits
    publications: _containers.RepeatedCompositeFieldContainer[Publication]
    state: str
    health: Health
    remount_count: int
    pid: int
    def __init__(self, volume_id: _Optional[str] = ..., staging_path: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., read_only: _Optional[bool] = ..., limits: _Optional[_Union[IOLimits, _Mapping]] = ..., publications: _Optional[_Iterable[_Union[Publication, _Mapping]]] = ..., state: _Optional[str] = ..., health: _Optional[_Union[Health, _Mapping]] = ..., remount_count: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("version", "pid")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    version: str
    pid: int
    def __init__(self, version: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProbeResponse(_message.Message):
    __slots__ = ("ready", "message", "volumes", "unhealthy_volumes")
    READY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    UNHEALTHY_VOLUMES_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    message: str
    volumes: int
    unhealthy_volumes: int
    def __init__(self, ready: _Optional[bool] = ..., message: _Optional[str] = ..., volumes: _Optional[int] = ..., unhealthy_volumes: _Optional[int] = ...) -> None: ...

class MountRequest(_message.Message):
    __slots__ = ("volume_id", "staging_path", "capacity_bytes", "read_only", "limits", "pod")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    STAGING_PATH_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    staging_path: str
    capacity_bytes: int
    read_only: bool
    limits: IOLimits
    pod: PodInfo
    def __init__(self, volume_id: _Optional[str] = ..., staging_path: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., read_only: _Optional[bool] = ..., limits: _Optional[_Union[IOLimits, _Mapping]] = ..., pod: _Optional[_Union[PodInfo, _Mapping]] = ...) -> None: ...

class MountResponse(_message.Message):
    __slots__ = ("volume",)
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    volume: Volume
    def __init__(self, volume: _Optional[_Union[Volume, _Mapping]] = ...) -> None: ...

class UnmountRequest(_message.Message):
    __slots__ = ("volume_id", "force")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    force: bool
    def __init__(self, volume_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class UnmountResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("volume_id", "target_path", "read_only", "pod")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_PATH_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    target_path: str
    read_only: bool
    pod: PodInfo
    def __init__(self, volume_id: _Optional[str] = ..., target_path: _Optional[str] = ..., read_only: _Optional[bool] = ..., pod: _Optional[_Union[PodInfo, _Mapping]] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnpublishRequest(_message.Message):
    __slots__ = ("volume_id", "target_path")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_PATH_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    target_path: str
    def __init__(self, volume_id: _Optional[str] = ..., target_path: _Optional[str] = ...) -> None: ...

class UnpublishResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResizeRequest(_message.Message):
    __slots__ = ("volume_id", "capacity_bytes")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    capacity_bytes: int
    def __init__(self, volume_id: _Optional[str] = ..., capacity_bytes: _Optional[int] = ...) -> None: ...

class ResizeResponse(_message.Message):
    __slots__ = ("capacity_bytes",)
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    capacity_bytes: int
    def __init__(self, capacity_bytes: _Optional[int] = ...) -> None: ...

class FreezeRequest(_message.Message):
    __slots__ = ("volume_ids", "timeout_seconds")
    VOLUME_IDS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    volume_ids: _containers.RepeatedScalarFieldContainer[str]
    timeout_seconds: int
    def __init__(self, volume_ids: _Optional[_Iterable[str]] = ..., timeout_seconds: _Optional[int] = ...) -> None: ...

class FreezeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ThawRequest(_message.Message):
    __slots__ = ("volume_ids",)
    VOLUME_IDS_FIELD_NUMBER: _ClassVar[int]
    volume_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, volume_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ThawResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetLimitsRequest(_message.Message):
    __slots__ = ("volume_id", "limits")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    limits: IOLimits
    def __init__(self, volume_id: _Optional[str] = ..., limits: _Optional[_Union[IOLimits, _Mapping]] = ...) -> None: ...

class SetLimitsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("volume_id", "target_path")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_PATH_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    target_path: str
    def __init__(self, volume_id: _Optional[str] = ..., target_path: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("volume_id", "capacity_bytes", "used_bytes", "available_bytes", "total_bytes", "used_inodes", "total_inodes", "available_inodes", "frozen", "read_only", "limits", "health", "remount_count")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_INODES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_INODES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_INODES_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    REMOUNT_COUNT_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    capacity_bytes: int
    used_bytes: int
    available_bytes: int
    total_bytes: int
    used_inodes: int
    total_inodes: int
    available_inodes: int
    frozen: bool
    read_only: bool
    limits: IOLimits
    health: Health
    remount_count: int
    def __init__(self, volume_id: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., available_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., used_inodes: _Optional[int] = ..., total_inodes: _Optional[int] = ..., available_inodes: _Optional[int] = ..., frozen: _Optional[bool] = ..., read_only: _Optional[bool] = ..., limits: _Optional[_Union[IOLimits, _Mapping]] = ..., health: _Optional[_Union[Health, _Mapping]] = ..., remount_count: _Optional[int] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("volumes",)
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    volumes: _containers.RepeatedCompositeFieldContainer[Volume]
    def __init__(self, volumes: _Optional[_Iterable[_Union[Volume, _Mapping]]] = ...) -> None: ...
