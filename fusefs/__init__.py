"""fusefs: the FUSE filesystem and daemon that serve every fusepath volume."""
