"""zk0 hub."""
