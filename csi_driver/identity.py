"""CSI Identity: who we are, what we offer, and whether we are ready."""

from __future__ import annotations

from google.protobuf.wrappers_pb2 import BoolValue

from csi_driver import __version__
from csi_driver.context import DriverContext
from csi_driver.gen import csi_pb2, csi_pb2_grpc

PluginCapability = csi_pb2.PluginCapability
#: Probe answers within about this: a daemon slower than this is "not ready".
#: It never touches a volume (the daemon's Ping does not either), so one stuck
#: volume cannot make the node look dead.
PING_TIMEOUT = 0.8


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx

    def GetPluginInfo(self, request, context):  # noqa: N802
        return csi_pb2.GetPluginInfoResponse(
            name=self.ctx.config.driver_name, vendor_version=__version__,
            manifest={"url": "https://github.com/fusepath/fusepath"},
        )

    def GetPluginCapabilities(self, request, context):  # noqa: N802
        caps = [
            PluginCapability(volume_expansion=PluginCapability.VolumeExpansion(
                type=PluginCapability.VolumeExpansion.ONLINE)),
        ]
        if self.ctx.config.runs_controller:
            caps += [
                _service(PluginCapability.Service.CONTROLLER_SERVICE),
                _service(PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS),
                _service(PluginCapability.Service.GROUP_CONTROLLER_SERVICE),
            ]
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request, context):  # noqa: N802
        """Ready only when the state DB answers and, on a node, fusefs answers too.

        Probe itself never fails: "not ready" is an answer, not an error, so
        the livenessprobe sidecar can tell a slow start from a dead driver.
        It answers within about PING_TIMEOUT.
        """
        return csi_pb2.ProbeResponse(ready=BoolValue(value=self.ready()))

    def ready(self) -> bool:
        if not self.ctx.store.healthy():
            return False
        if self.ctx.config.runs_node and self.ctx.fusefs is not None:
            return self.ctx.fusefs.healthy(timeout=PING_TIMEOUT)
        return True


def _service(kind: int) -> PluginCapability:
    return PluginCapability(service=PluginCapability.Service(type=kind))
