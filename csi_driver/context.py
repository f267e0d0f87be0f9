"""What every service shares: configuration, state, locks and the fusefs link."""

from __future__ import annotations

import os
from dataclasses import dataclass

from csi_driver.config import Config
from csi_driver.fusefs_link import FuseFSLink
from csi_driver.layout import Layout
from csi_driver.locks import KeyedLocks
from csi_driver.state import Store

TOPOLOGY_KEY = "topology.fusepath.csi.io/node"


@dataclass
class DriverContext:
    config: Config
    layout: Layout
    store: Store
    locks: KeyedLocks
    fusefs: FuseFSLink | None

    @property
    def topology(self) -> dict[str, str]:
        return {TOPOLOGY_KEY: self.config.node_id}

    def filesystem_bytes(self) -> int:
        st = os.statvfs(self.layout.volumes)
        return st.f_blocks * st.f_frsize

    def max_committed(self) -> int:
        """The most capacity this node will ever promise, in total (DESIGN §4)."""
        return max(0, int(self.filesystem_bytes() * self.config.overcommit_ratio) - self.config.reserve)

    def available_capacity(self) -> int:
        return max(0, self.max_committed() - self.store.committed_bytes())
