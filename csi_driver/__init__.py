"""fusepath CSI driver: Identity, Controller, Node and GroupController services."""

__version__ = "0.1.0"
DRIVER_NAME = "fusepath.csi.io"
