"""Command-line flags, each also read from an environment variable (DESIGN §2).

The variable for ``--some-flag`` is ``FUSEPATH_SOME_FLAG``; a flag on the
command line wins over the environment. ``CSI_ENDPOINT``, the variable the
CSI spec names, is honoured for ``--endpoint`` as well.
"""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from csi_driver import DRIVER_NAME

MODES = ("all", "controller", "node")
GiB = 1 << 30


@dataclass(frozen=True)
class Config:
    endpoint: str = "unix:///run/fusepath/csi.sock"
    node_id: str = ""
    driver_name: str = DRIVER_NAME
    data_dir: Path = Path("/var/lib/fusepath")
    mode: str = "all"
    fusefs: str = "embedded"
    #: The embedded daemon's engine (``fusefs serve --engine``).
    fusefs_engine: str = "kernel"
    metrics_address: str = ":9808"
    log_format: str = "json"
    log_level: str = "info"
    kubelet_dir: Path = Path("/var/lib/kubelet")
    enable_attach: bool = False
    #: Reported in NodeGetInfo, so the scheduler never packs more of our
    #: volumes on a node than it can serve: each staged volume is a FUSE
    #: session process of 20-30 MiB, so 256 is about 7 GiB at most.
    max_volumes_per_node: int = 256
    reserve: int = 0
    overcommit_ratio: float = 1.0
    default_capacity: int = GiB
    max_inline_volume_size: int = GiB
    workers: int = 32

    @property
    def runs_controller(self) -> bool:
        return self.mode in ("all", "controller")

    @property
    def runs_node(self) -> bool:
        return self.mode in ("all", "node")

    @property
    def socket_path(self) -> Path:
        return Path(self.endpoint.removeprefix("unix://"))


def _env(flag: str) -> str:
    return "FUSEPATH_" + flag.upper().replace("-", "_")


def parse_size(text: str) -> int:
    """``1Gi``, ``512Mi``, ``10G``, ``4096``: bytes as an int."""
    units = {"ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40,
             "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    value = text.strip().lower().removesuffix("b")
    for suffix in sorted(units, key=len, reverse=True):
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * units[suffix])
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusepath-csi", description="fusepath CSI driver")
    defaults = Config()

    def add(flag: str, default: object, help_text: str, **kw: object) -> None:
        env = os.environ.get(_env(flag))
        if flag == "endpoint" and env is None:
            env = os.environ.get("CSI_ENDPOINT")
        p.add_argument(f"--{flag}", default=env if env is not None else default,
                       help=f"{help_text} [env {_env(flag)}]", **kw)

    add("endpoint", defaults.endpoint, "gRPC endpoint, unix:///path")
    add("node-id", socket.gethostname(), "this node's ID")
    add("driver-name", defaults.driver_name, "CSI driver name")
    add("data-dir", str(defaults.data_dir), "state, volumes and snapshots")
    add("mode", defaults.mode, "which services to run", choices=MODES)
    add("fusefs", defaults.fusefs, "'embedded' or the unix:// endpoint of a fusefs daemon")
    add("fusefs-engine", defaults.fusefs_engine,
        "engine of the embedded fusefs daemon; kernel also starts a descriptor holder beside it, so mounts "
        "outlive the daemon (a sidecar daemon takes its own --engine)", choices=("libfuse", "kernel"))
    add("metrics-address", defaults.metrics_address, "host:port for /metrics and /healthz; empty disables")
    add("log-format", defaults.log_format, "json or text", choices=("json", "text"))
    add("log-level", defaults.log_level, "debug, info, warning or error")
    add("kubelet-dir", str(defaults.kubelet_dir), "staging and target paths must be under it")
    add("max-volumes-per-node", defaults.max_volumes_per_node, "volumes this node reports it can hold (NodeGetInfo); 0 means no limit", type=int)
    add("reserve", "0", "bytes of the filesystem never promised to volumes (e.g. 10Gi)")
    add("overcommit-ratio", defaults.overcommit_ratio, "promise up to this many times the filesystem size",
        type=float)
    add("default-capacity", "1Gi", "capacity of a volume created without a capacity range")
    add("max-inline-volume-size", "1Gi",
        "largest CSI ephemeral inline volume a pod spec may ask for (the pod author chooses the size)")
    add("workers", defaults.workers, "gRPC worker threads", type=int)
    attach_env = os.environ.get(_env("enable-attach"), "")
    p.add_argument("--enable-attach", action="store_true", default=attach_env.lower() in ("1", "true", "yes"),
                   help=f"serve ControllerPublish/Unpublish (off in the manifests) [env {_env('enable-attach')}]")
    return p


def from_args(args: argparse.Namespace) -> Config:
    if not str(args.endpoint).startswith("unix://"):
        raise SystemExit("--endpoint must be unix:///path")
    if args.overcommit_ratio <= 0:
        raise SystemExit("--overcommit-ratio must be positive")
    return Config(
        endpoint=args.endpoint,
        node_id=args.node_id,
        driver_name=args.driver_name,
        data_dir=Path(args.data_dir).absolute(),
        mode=args.mode,
        fusefs=args.fusefs,
        fusefs_engine=args.fusefs_engine,
        metrics_address=args.metrics_address,
        log_format=args.log_format,
        log_level=args.log_level,
        kubelet_dir=Path(args.kubelet_dir).absolute(),
        enable_attach=bool(args.enable_attach),
        max_volumes_per_node=int(args.max_volumes_per_node),
        reserve=parse_size(str(args.reserve)),
        overcommit_ratio=float(args.overcommit_ratio),
        default_capacity=parse_size(str(args.default_capacity)),
        max_inline_volume_size=parse_size(str(args.max_inline_volume_size)),
        workers=int(args.workers),
    )
