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
from typing import Any

import grpc
from google.protobuf import json_format

from csi_driver.config import parse_size
from csi_driver.gen import csi_pb2, csi_pb2_grpc

SERVICES = {
    "Identity": csi_pb2_grpc.IdentityStub,
    "Controller": csi_pb2_grpc.ControllerStub,
    "Node": csi_pb2_grpc.NodeStub,
    "GroupController": csi_pb2_grpc.GroupControllerStub,
}
Builder = Callable[[argparse.Namespace], Any]


def default_endpoint() -> str:
    if os.environ.get("CSI_ENDPOINT"):
        return os.environ["CSI_ENDPOINT"]
    local = Path.cwd() / ".run" / "csi.sock"
    if local.exists():
        return f"unix://{local}"
    return "unix:///run/fusepath/csi.sock"


def _cap(args: argparse.Namespace) -> csi_pb2.VolumeCapability:
    mode = csi_pb2.VolumeCapability.AccessMode.Mode.Value(getattr(args, "access_mode", "SINGLE_NODE_WRITER"))
    cap = csi_pb2.VolumeCapability(access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))
    if getattr(args, "block", False):
        cap.block.SetInParent()
    else:
        cap.mount.SetInParent()
    return cap


def _params(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--param wants key=value, got {pair!r}")
        out[key] = value
    return out


def _create_volume(a: argparse.Namespace) -> csi_pb2.CreateVolumeRequest:
    req = csi_pb2.CreateVolumeRequest(name=a.name, volume_capabilities=[_cap(a)], parameters=_params(a.param))
    if a.capacity:
        req.capacity_range.required_bytes = parse_size(a.capacity)
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


# command -> (service, method, arguments, request builder)
COMMANDS: dict[str, tuple[str, str, list[tuple[str, dict]], Builder]] = {
    "get-plugin-info": ("Identity", "GetPluginInfo", [], lambda a: csi_pb2.GetPluginInfoRequest()),
    "get-plugin-capabilities": ("Identity", "GetPluginCapabilities", [],
                                lambda a: csi_pb2.GetPluginCapabilitiesRequest()),
    "probe": ("Identity", "Probe", [], lambda a: csi_pb2.ProbeRequest()),
    "controller-capabilities": ("Controller", "ControllerGetCapabilities", [],
                                lambda a: csi_pb2.ControllerGetCapabilitiesRequest()),
    "create-volume": ("Controller", "CreateVolume", [
        ("name", {}), ("--capacity", {"default": ""}), ("--block", {"action": "store_true"}),
        ("--access-mode", {"default": "SINGLE_NODE_WRITER"}), ("--param", {"action": "append"}),
        ("--from-snapshot", {"default": ""}), ("--from-volume", {"default": ""})], _create_volume),
    "delete-volume": ("Controller", "DeleteVolume", [("volume_id", {})],
                      lambda a: csi_pb2.DeleteVolumeRequest(volume_id=a.volume_id)),
    "get-volume": ("Controller", "ControllerGetVolume", [("volume_id", {})],
                   lambda a: csi_pb2.ControllerGetVolumeRequest(volume_id=a.volume_id)),
    "list-volumes": ("Controller", "ListVolumes", [("--max-entries", {"type": int, "default": 0}),
                                                   ("--starting-token", {"default": ""})],
                     lambda a: csi_pb2.ListVolumesRequest(max_entries=a.max_entries,
                                                          starting_token=a.starting_token)),
    "get-capacity": ("Controller", "GetCapacity", [], lambda a: csi_pb2.GetCapacityRequest()),
    "validate-volume": ("Controller", "ValidateVolumeCapabilities", [("volume_id", {}),
                                                                     ("--block", {"action": "store_true"})],
                        lambda a: csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=a.volume_id,
                                                                            volume_capabilities=[_cap(a)])),
    "expand-volume": ("Controller", "ControllerExpandVolume", [("volume_id", {}), ("size", {})],
                      lambda a: csi_pb2.ControllerExpandVolumeRequest(
                          volume_id=a.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=parse_size(a.size)))),
    "modify-volume": ("Controller", "ControllerModifyVolume", [("volume_id", {}), ("param", {"nargs": "*"})],
                      lambda a: csi_pb2.ControllerModifyVolumeRequest(volume_id=a.volume_id,
                                                                      mutable_parameters=_params(a.param))),
    "controller-publish": ("Controller", "ControllerPublishVolume", [("volume_id", {}), ("node_id", {}),
                                                                     ("--readonly", {"action": "store_true"})],
                           lambda a: csi_pb2.ControllerPublishVolumeRequest(
                               volume_id=a.volume_id, node_id=a.node_id, readonly=a.readonly,
                               volume_capability=_cap(a))),
    "controller-unpublish": ("Controller", "ControllerUnpublishVolume", [("volume_id", {}), ("node_id", {})],
                             lambda a: csi_pb2.ControllerUnpublishVolumeRequest(volume_id=a.volume_id,
                                                                                node_id=a.node_id)),
    "create-snapshot": ("Controller", "CreateSnapshot", [("name", {}), ("volume_id", {}),
                                                         ("--param", {"action": "append"})],
                        lambda a: csi_pb2.CreateSnapshotRequest(name=a.name, source_volume_id=a.volume_id,
                                                                parameters=_params(a.param))),
    "delete-snapshot": ("Controller", "DeleteSnapshot", [("snapshot_id", {})],
                        lambda a: csi_pb2.DeleteSnapshotRequest(snapshot_id=a.snapshot_id)),
    "get-snapshot": ("Controller", "GetSnapshot", [("snapshot_id", {})],
                     lambda a: csi_pb2.GetSnapshotRequest(snapshot_id=a.snapshot_id)),
    "list-snapshots": ("Controller", "ListSnapshots", [("--source-volume-id", {"default": ""}),
                                                       ("--max-entries", {"type": int, "default": 0}),
                                                       ("--starting-token", {"default": ""})],
                       lambda a: csi_pb2.ListSnapshotsRequest(source_volume_id=a.source_volume_id,
                                                              max_entries=a.max_entries,
                                                              starting_token=a.starting_token)),
    "create-group-snapshot": ("GroupController", "CreateVolumeGroupSnapshot", [("name", {}),
                                                                               ("volume_ids", {"nargs": "+"})],
                              lambda a: csi_pb2.CreateVolumeGroupSnapshotRequest(name=a.name,
                                                                                 source_volume_ids=a.volume_ids)),
    "delete-group-snapshot": ("GroupController", "DeleteVolumeGroupSnapshot", [("group_snapshot_id", {})],
                              lambda a: csi_pb2.DeleteVolumeGroupSnapshotRequest(
                                  group_snapshot_id=a.group_snapshot_id)),
    "get-group-snapshot": ("GroupController", "GetVolumeGroupSnapshot", [("group_snapshot_id", {})],
                           lambda a: csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=a.group_snapshot_id)),
    "node-info": ("Node", "NodeGetInfo", [], lambda a: csi_pb2.NodeGetInfoRequest()),
    "node-capabilities": ("Node", "NodeGetCapabilities", [], lambda a: csi_pb2.NodeGetCapabilitiesRequest()),
    "node-stage": ("Node", "NodeStageVolume", [("volume_id", {}), ("staging_path", {}),
                                               ("--block", {"action": "store_true"}),
                                               ("--access-mode", {"default": "SINGLE_NODE_WRITER"})], _node_stage),
    "node-unstage": ("Node", "NodeUnstageVolume", [("volume_id", {}), ("staging_path", {})],
                     lambda a: csi_pb2.NodeUnstageVolumeRequest(volume_id=a.volume_id,
                                                                staging_target_path=a.staging_path)),
    "node-publish": ("Node", "NodePublishVolume", [
        ("volume_id", {}), ("target_path", {}), ("--staging-path", {"default": ""}),
        ("--readonly", {"action": "store_true"}), ("--block", {"action": "store_true"}),
        ("--access-mode", {"default": "SINGLE_NODE_WRITER"}), ("--context", {"action": "append"})], _node_publish),
    "node-unpublish": ("Node", "NodeUnpublishVolume", [("volume_id", {}), ("target_path", {})],
                       lambda a: csi_pb2.NodeUnpublishVolumeRequest(volume_id=a.volume_id,
                                                                    target_path=a.target_path)),
    "node-stats": ("Node", "NodeGetVolumeStats", [("volume_id", {}), ("volume_path", {})],
                   lambda a: csi_pb2.NodeGetVolumeStatsRequest(volume_id=a.volume_id, volume_path=a.volume_path)),
    "node-expand": ("Node", "NodeExpandVolume", [("volume_id", {}), ("volume_path", {}), ("size", {})],
                    lambda a: csi_pb2.NodeExpandVolumeRequest(
                        volume_id=a.volume_id, volume_path=a.volume_path,
                        capacity_range=csi_pb2.CapacityRange(required_bytes=parse_size(a.size)))),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusepath-csi client", description="call CSI RPCs and print JSON")
    p.add_argument("--endpoint", default=None, help="unix:///path (default: $CSI_ENDPOINT, ./.run/csi.sock, "
                                                    "unix:///run/fusepath/csi.sock)")
    p.add_argument("--timeout", type=float, default=60.0)
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_svc, method, arguments, _build) in COMMANDS.items():
        cmd = sub.add_parser(name, help=method)
        for flag, kw in arguments:
            cmd.add_argument(flag, **kw)
    call = sub.add_parser("call", help="any RPC: call Service.Method '{json request}'")
    call.add_argument("method", help="e.g. Controller.ListVolumes")
    call.add_argument("request", nargs="?", default="{}")
    return p


def _generic(method: str, body: str) -> tuple[str, str, Any]:
    service, _, name = method.partition(".")
    if service not in SERVICES or not name:
        raise SystemExit(f"method must be one of {', '.join(SERVICES)} followed by .RpcName")
    request_type = getattr(csi_pb2, f"{name}Request", None)
    if request_type is None:
        raise SystemExit(f"unknown RPC {name}")
    return service, name, json_format.Parse(body, request_type())


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "call":
        service, method, request = _generic(args.method, args.request)
    else:
        service, method, _arguments, build = COMMANDS[args.command]
        request = build(args)
    endpoint = args.endpoint or default_endpoint()
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
