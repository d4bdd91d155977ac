"""Getting and losing machines: SkyPilot in the cloud, virtual nodes on this machine."""
