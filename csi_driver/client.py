"""``fusepath-csi client``: call any CSI RPC from the shell and print JSON.

In the spirit of ``csc``: friendly subcommands for the common calls
(``create-volume NAME --capacity 1Gi``), and ``call METHOD JSON`` for
anything else, so a person can drive the driver by hand while debugging.

The endpoint is ``--endpoint``, else ``$CSI_ENDPOINT``, else the socket of a
local ``make run`` (``./.run/csi.sock``) when present, else the default
``unix:///run/fusepath/csi.sock``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format

from csi_driver import validation
from csi_driver.config import parse_size
from csi_driver.gen import csi_pb2, csi_pb2_grpc

SERVICES = {
    "Identity": csi_pb2_grpc.IdentityStub,
    "Controller": csi_pb2_grpc.ControllerStub,
    "Node": csi_pb2_grpc.NodeStub,
    "GroupController": csi_pb2_grpc.GroupControllerStub,
}
Builder = Callable[[argparse.Namespace], Any]


class ClientError(Exception):
    """Bad input or an unreachable driver: one line on stderr, exit code 2, no traceback."""


class ClientParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and ``--help`` is one command away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def default_endpoint() -> str:
    if os.environ.get("CSI_ENDPOINT"):
        return os.environ["CSI_ENDPOINT"]
    local = Path.cwd() / ".run" / "csi.sock"
    if local.exists():
        return f"unix://{local}"
    return "unix:///run/fusepath/csi.sock"


def socket_of(endpoint: str) -> str:
    """The socket path of ``unix:///abs/path``; anything else is refused (gRPC would try DNS)."""
    path = endpoint.removeprefix("unix://")
    if not endpoint.startswith("unix://") or not path.startswith("/"):
        raise ClientError(f"the endpoint must be unix:///absolute/path/to/csi.sock, not {endpoint!r}")
    if not Path(path).exists():
        raise ClientError(f"no socket at {path}: is the driver running (`make run`)? Or pass --endpoint")
    return path


# --- argument types: each turns bad input into one line ---------------------------

def _checked(text: str, convert: Callable[[str], Any], ok: Callable[[Any], bool], complaint: str) -> Any:
    """``convert(text)`` when it works and passes ``ok``; else argparse's one-line error."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(complaint) from None
    if not ok(value):
        raise argparse.ArgumentTypeError(complaint)
    return value


def size(text: str) -> int:
    """Bytes, from ``4096``, ``512Mi``, ``1Gi``, ``10G``."""
    return _checked(text, parse_size, lambda v: v >= 0,
                    f"{text!r} is not a size: give bytes, or a number with {SIZE_UNITS}, e.g. 1Gi")


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def our_id(prefix: str, what: str, where: str) -> Callable[[str], str]:
    """An ID of the only form the driver hands out; a name or a typo is refused here, not
    silently answered (DeleteVolume of an unknown ID succeeds, as the CSI spec wants)."""

    def check(text: str) -> str:
        if not validation.is_id(text, prefix):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {what} ID: IDs look like {prefix}<32 hex digits> ({where})")
        return text

    check.__name__ = f"{what} ID"  # what argparse calls the type in its messages
    return check


def positive_seconds(text: str) -> float:
    return _checked(text, float, lambda v: v > 0, f"{text!r} is not a number of seconds above 0")


def non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


SIZE_UNITS = "Ki, Mi, Gi, Ti (powers of 1024) or k, M, G, T (powers of 1000)"
ACCESS_MODES = [name for name in csi_pb2.VolumeCapability.AccessMode.Mode.keys() if name != "UNKNOWN"]


def _cap(args: argparse.Namespace) -> csi_pb2.VolumeCapability:
    mode = csi_pb2.VolumeCapability.AccessMode.Mode.Value(getattr(args, "access_mode", "SINGLE_NODE_WRITER"))
    cap = csi_pb2.VolumeCapability(access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))
    if getattr(args, "block", False):
        cap.block.SetInParent()
    else:
        cap.mount.SetInParent()
    return cap


def _params(pairs: list[tuple[str, str]] | None) -> dict[str, str]:
    return dict(pairs or [])


def _create_volume(a: argparse.Namespace) -> csi_pb2.CreateVolumeRequest:
    req = csi_pb2.CreateVolumeRequest(name=a.name, volume_capabilities=[_cap(a)], parameters=_params(a.param))
    if a.capacity:
        req.capacity_range.required_bytes = a.capacity
    if a.from_snapshot:
        req.volume_content_source.snapshot.snapshot_id = a.from_snapshot
    if a.from_volume:
        req.volume_content_source.volume.volume_id = a.from_volume
    return req


def _node_stage(a: argparse.Namespace) -> csi_pb2.NodeStageVolumeRequest:
    return csi_pb2.NodeStageVolumeRequest(volume_id=a.volume_id, staging_target_path=a.staging_path,
                                          volume_capability=_cap(a))


def _node_publish(a: argparse.Namespace) -> csi_pb2.NodePublishVolumeRequest:
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=a.volume_id, target_path=a.target_path, staging_target_path=a.staging_path or "",
        volume_capability=_cap(a), readonly=a.readonly, volume_context=_params(a.context))


VOLUME_ID_TYPE = our_id(validation.VOLUME_PREFIX, "volume",
                        "create-volume prints it, list-volumes shows them all")
SNAPSHOT_ID_TYPE = our_id(validation.SNAPSHOT_PREFIX, "snapshot",
                          "create-snapshot prints it, list-snapshots shows them all")
GROUP_ID_TYPE = our_id(validation.GROUP_SNAPSHOT_PREFIX, "group snapshot", "create-group-snapshot prints it")

# --- arguments, each with what it means and its unit or allowed values ----------------
Arg = tuple[str, dict[str, Any]]
VOLUME_ID: Arg = ("volume_id", {"type": VOLUME_ID_TYPE,
                                "help": "the volume's ID, vol-<32 hex digits> (create-volume prints it; "
                                        "not the volume's name)"})
NODE_VOLUME_ID: Arg = ("volume_id", {"help": "the volume's ID: vol-<32 hex digits>, or the kubelet's ID of an "
                                             "ephemeral inline volume"})
SNAPSHOT_ID: Arg = ("snapshot_id", {"type": SNAPSHOT_ID_TYPE,
                                    "help": "the snapshot's ID, snap-<32 hex digits> (create-snapshot prints it)"})
GROUP_ID: Arg = ("group_snapshot_id", {"type": GROUP_ID_TYPE,
                                       "help": "the group snapshot's ID, group-<32 hex digits>"})
NODE_ID: Arg = ("node_id", {"help": "the node's ID, as node-info prints it (the driver's --node-id)"})
NAME: Arg = ("name", {"help": "the CO's name for it (any string up to 128 bytes); the same name again returns "
                              "the same object"})
SIZE: Arg = ("size", {"type": size, "help": f"the new size: bytes, or a number with {SIZE_UNITS}, e.g. 2Gi"})
CAPACITY: Arg = ("--capacity", {"type": size, "default": 0, "metavar": "SIZE",
                                "help": f"bytes, or a number with {SIZE_UNITS}, e.g. 1Gi "
                                        "(default: the driver's --default-capacity)"})
BLOCK: Arg = ("--block", {"action": "store_true",
                          "help": "a raw block volume (a loop device over a sparse file) instead of a filesystem"})
ACCESS_MODE: Arg = ("--access-mode", {"choices": ACCESS_MODES, "default": "SINGLE_NODE_WRITER", "metavar": "MODE",
                                      "help": f"one of {', '.join(ACCESS_MODES)} (default: SINGLE_NODE_WRITER)"})
READONLY: Arg = ("--readonly", {"action": "store_true", "help": "read-only: writes fail with EROFS"})
VOLUME_PARAM: Arg = ("--param", {"action": "append", "type": key_value, "metavar": "KEY=VALUE",
                                 "help": "a StorageClass parameter, repeatable: mounter=fusefs|bind, "
                                         "ioBytesPerSecond=N (bytes/s, 0 = unlimited), "
                                         "ioOpsPerSecond=N (operations/s, 0 = unlimited)"})
SNAPSHOT_PARAM: Arg = ("--param", {"action": "append", "type": key_value, "metavar": "KEY=VALUE",
                                   "help": "a VolumeSnapshotClass parameter: compression=none|gzip|zstd "
                                           "(default none)"})
MAX_ENTRIES: Arg = ("--max-entries", {"type": non_negative, "default": 0, "metavar": "N",
                                      "help": "entries per page, a whole number (default 0: all of them)"})
STARTING_TOKEN: Arg = ("--starting-token", {"default": "", "metavar": "TOKEN",
                                            "help": "next_token from the previous page (default: the first page)"})
STAGING_PATH: Arg = ("staging_path", {"help": "absolute path under the driver's --kubelet-dir where the volume is "
                                              "staged (mounted once per node)"})
TARGET_PATH: Arg = ("target_path", {"help": "absolute path under the driver's --kubelet-dir where the pod sees "
                                            "the volume"})
VOLUME_PATH: Arg = ("volume_path", {"help": "absolute path the volume is published or staged at"})

# command -> (service, method, arguments, request builder)
COMMANDS: dict[str, tuple[str, str, list[Arg], Builder]] = {
    "get-plugin-info": ("Identity", "GetPluginInfo", [], lambda a: csi_pb2.GetPluginInfoRequest()),
    "get-plugin-capabilities": ("Identity", "GetPluginCapabilities", [],
                                lambda a: csi_pb2.GetPluginCapabilitiesRequest()),
    "probe": ("Identity", "Probe", [], lambda a: csi_pb2.ProbeRequest()),
    "controller-capabilities": ("Controller", "ControllerGetCapabilities", [],
                                lambda a: csi_pb2.ControllerGetCapabilitiesRequest()),
    "create-volume": ("Controller", "CreateVolume", [
        NAME, CAPACITY, BLOCK, ACCESS_MODE, VOLUME_PARAM,
        ("--from-snapshot", {"type": SNAPSHOT_ID_TYPE, "default": None,
                             "metavar": "SNAPSHOT_ID", "help": "restore this snapshot (snap-<32 hex digits>)"}),
        ("--from-volume", {"type": VOLUME_ID_TYPE, "default": None,
                           "metavar": "VOLUME_ID", "help": "clone this volume (vol-<32 hex digits>)"})],
        _create_volume),
    "delete-volume": ("Controller", "DeleteVolume", [VOLUME_ID],
                      lambda a: csi_pb2.DeleteVolumeRequest(volume_id=a.volume_id)),
    "get-volume": ("Controller", "ControllerGetVolume", [VOLUME_ID],
                   lambda a: csi_pb2.ControllerGetVolumeRequest(volume_id=a.volume_id)),
    "list-volumes": ("Controller", "ListVolumes", [MAX_ENTRIES, STARTING_TOKEN],
                     lambda a: csi_pb2.ListVolumesRequest(max_entries=a.max_entries,
                                                          starting_token=a.starting_token)),
    "get-capacity": ("Controller", "GetCapacity", [], lambda a: csi_pb2.GetCapacityRequest()),
    "validate-volume": ("Controller", "ValidateVolumeCapabilities", [VOLUME_ID, BLOCK, ACCESS_MODE],
                        lambda a: csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=a.volume_id,
                                                                            volume_capabilities=[_cap(a)])),
    "expand-volume": ("Controller", "ControllerExpandVolume", [VOLUME_ID, SIZE],
                      lambda a: csi_pb2.ControllerExpandVolumeRequest(
                          volume_id=a.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=a.size))),
    "modify-volume": ("Controller", "ControllerModifyVolume", [
        VOLUME_ID, ("param", {"nargs": "*", "type": key_value, "metavar": "KEY=VALUE",
                              "help": "the mutable parameters: ioBytesPerSecond=N (bytes/s), "
                                      "ioOpsPerSecond=N (operations/s); 0 = unlimited"})],
        lambda a: csi_pb2.ControllerModifyVolumeRequest(volume_id=a.volume_id, mutable_parameters=_params(a.param))),
    "controller-publish": ("Controller", "ControllerPublishVolume", [VOLUME_ID, NODE_ID, READONLY, ACCESS_MODE],
                           lambda a: csi_pb2.ControllerPublishVolumeRequest(
                               volume_id=a.volume_id, node_id=a.node_id, readonly=a.readonly,
                               volume_capability=_cap(a))),
    "controller-unpublish": ("Controller", "ControllerUnpublishVolume", [VOLUME_ID, NODE_ID],
                             lambda a: csi_pb2.ControllerUnpublishVolumeRequest(volume_id=a.volume_id,
                                                                                node_id=a.node_id)),
    "create-snapshot": ("Controller", "CreateSnapshot", [NAME, VOLUME_ID, SNAPSHOT_PARAM],
                        lambda a: csi_pb2.CreateSnapshotRequest(name=a.name, source_volume_id=a.volume_id,
                                                                parameters=_params(a.param))),
    "delete-snapshot": ("Controller", "DeleteSnapshot", [SNAPSHOT_ID],
                        lambda a: csi_pb2.DeleteSnapshotRequest(snapshot_id=a.snapshot_id)),
    "get-snapshot": ("Controller", "GetSnapshot", [SNAPSHOT_ID],
                     lambda a: csi_pb2.GetSnapshotRequest(snapshot_id=a.snapshot_id)),
    "list-snapshots": ("Controller", "ListSnapshots", [
        ("--source-volume-id", {"type": VOLUME_ID_TYPE, "default": None,
                                "metavar": "VOLUME_ID", "help": "only this volume's snapshots (vol-<32 hex digits>)"}),
        MAX_ENTRIES, STARTING_TOKEN],
        lambda a: csi_pb2.ListSnapshotsRequest(source_volume_id=a.source_volume_id or "", max_entries=a.max_entries,
                                               starting_token=a.starting_token)),
    "create-group-snapshot": ("GroupController", "CreateVolumeGroupSnapshot", [
        NAME, ("volume_ids", {"nargs": "+", "type": VOLUME_ID_TYPE, "metavar": "VOLUME_ID",
                              "help": "the member volumes' IDs (vol-<32 hex digits>)"})],
        lambda a: csi_pb2.CreateVolumeGroupSnapshotRequest(name=a.name, source_volume_ids=a.volume_ids)),
    "delete-group-snapshot": ("GroupController", "DeleteVolumeGroupSnapshot", [GROUP_ID],
                              lambda a: csi_pb2.DeleteVolumeGroupSnapshotRequest(
                                  group_snapshot_id=a.group_snapshot_id)),
    "get-group-snapshot": ("GroupController", "GetVolumeGroupSnapshot", [GROUP_ID],
                           lambda a: csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=a.group_snapshot_id)),
    "node-info": ("Node", "NodeGetInfo", [], lambda a: csi_pb2.NodeGetInfoRequest()),
    "node-capabilities": ("Node", "NodeGetCapabilities", [], lambda a: csi_pb2.NodeGetCapabilitiesRequest()),
    "node-stage": ("Node", "NodeStageVolume", [NODE_VOLUME_ID, STAGING_PATH, BLOCK, ACCESS_MODE], _node_stage),
    "node-unstage": ("Node", "NodeUnstageVolume", [NODE_VOLUME_ID, STAGING_PATH],
                     lambda a: csi_pb2.NodeUnstageVolumeRequest(volume_id=a.volume_id,
                                                                staging_target_path=a.staging_path)),
    "node-publish": ("Node", "NodePublishVolume", [
        NODE_VOLUME_ID, TARGET_PATH,
        ("--staging-path", {"default": "", "metavar": "PATH",
                            "help": "where node-stage staged it (required unless it is an inline volume)"}),
        READONLY, BLOCK, ACCESS_MODE,
        ("--context", {"action": "append", "type": key_value, "metavar": "KEY=VALUE",
                       "help": "volume context, repeatable; an inline volume needs "
                               "csi.storage.k8s.io/ephemeral=true and may set size=SIZE (e.g. 256Mi)"})],
        _node_publish),
    "node-unpublish": ("Node", "NodeUnpublishVolume", [NODE_VOLUME_ID, TARGET_PATH],
                       lambda a: csi_pb2.NodeUnpublishVolumeRequest(volume_id=a.volume_id,
                                                                    target_path=a.target_path)),
    "node-stats": ("Node", "NodeGetVolumeStats", [NODE_VOLUME_ID, VOLUME_PATH],
                   lambda a: csi_pb2.NodeGetVolumeStatsRequest(volume_id=a.volume_id, volume_path=a.volume_path)),
    "node-expand": ("Node", "NodeExpandVolume", [NODE_VOLUME_ID, VOLUME_PATH, SIZE],
                    lambda a: csi_pb2.NodeExpandVolumeRequest(
                        volume_id=a.volume_id, volume_path=a.volume_path,
                        capacity_range=csi_pb2.CapacityRange(required_bytes=a.size))),
}


def build_parser() -> argparse.ArgumentParser:
    p = ClientParser(prog="fusepath-csi client",
                     description="Call a CSI RPC on a running driver and print the answer as JSON. "
                                 "An RPC error prints {\"error\": {\"code\", \"message\"}} and exits 1; "
                                 "bad input prints one line on stderr and exits 2.")
    p.add_argument("--endpoint", default=None, metavar="unix:///PATH",
                   help="the driver's socket (default: $CSI_ENDPOINT, else ./.run/csi.sock when it exists, "
                        "else unix:///run/fusepath/csi.sock)")
    p.add_argument("--timeout", type=positive_seconds, default=60.0, metavar="SECONDS",
                   help="how long to wait for the answer, in seconds (default 60)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (service, method, arguments, _build) in COMMANDS.items():
        cmd = sub.add_parser(name, help=f"{service}.{method}", description=f"CSI {service}.{method}")
        for flag, kw in arguments:
            cmd.add_argument(flag, **kw)
    call = sub.add_parser("call", help="any RPC: call Service.Method '{json request}'",
                          description="Any CSI RPC, with the request as JSON.")
    call.add_argument("method", help=f"Service.Method, the service one of {', '.join(SERVICES)}; "
                                     "e.g. Controller.ListVolumes")
    call.add_argument("request", nargs="?", default="{}",
                      help="the request as JSON, with csi.proto's field names, e.g. "
                           "'{\"volume_id\": \"vol-...\"}' (default {})")
    return p


def _generic(method: str, body: str) -> tuple[str, str, Any]:
    service, _, name = method.partition(".")
    if service not in SERVICES or not name:
        raise ClientError(f"{method!r}: the method must be Service.Method, the service one of "
                          f"{', '.join(SERVICES)} (e.g. Controller.ListVolumes)")
    request_type = getattr(csi_pb2, f"{name}Request", None)
    if request_type is None or name not in csi_pb2.DESCRIPTOR.services_by_name[service].methods_by_name:
        raise ClientError(f"{service} has no RPC {name!r}")
    try:
        return service, name, json_format.Parse(body, request_type())
    except json_format.ParseError as exc:
        detail = " ".join(str(exc).split())  # protobuf's message may span lines
        raise ClientError(f"the request is not a valid {name}Request in JSON: {detail}") from None


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "call":
            service, method, request = _generic(args.method, args.request)
        else:
            service, method, _arguments, build = COMMANDS[args.command]
            request = build(args)
        endpoint = args.endpoint or default_endpoint()
        socket_of(endpoint)
    except ClientError as exc:
        print(f"fusepath-csi client: error: {exc}", file=sys.stderr)
        return 2
    with grpc.insecure_channel(endpoint) as channel:
        stub = SERVICES[service](channel)
        try:
            response = getattr(stub, method)(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            json.dump({"error": {"code": exc.code().name, "message": exc.details()}}, sys.stdout, indent=2)
            print()
            return 1
    print(json_format.MessageToJson(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))
    return 0
