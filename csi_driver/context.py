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
        """The most capacity this node may have promised in total, as of now.

        Two bounds, the smaller wins:

        - the filesystem's size (times ``--overcommit-ratio``) less ``--reserve``;
        - what is free right now (``f_bavail``: anything else on the disk, the
          driver's own files and the volumes' data already count) less
          ``--reserve``, plus nothing for what volumes were promised: the caller
          subtracts every promise. A volume's written data is thus counted twice
          (in the free space and in its promise), which is conservative, but
          keeps the sum O(1) per call and never promises bytes the disk does not
          have, whoever else fills it (README, "Capacity").
        """
        st = os.statvfs(self.layout.volumes)
        ratio = self.config.overcommit_ratio
        by_size = int(st.f_blocks * st.f_frsize * ratio) - self.config.reserve
        by_free = int((st.f_bavail * st.f_frsize - self.config.reserve) * ratio)
        return max(0, min(by_size, by_free))

    def available_capacity(self) -> int:
        """What GetCapacity reports and CreateVolume can still promise."""
        return max(0, self.max_committed() - self.store.committed_bytes())
