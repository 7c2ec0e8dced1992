"""zk0 shared."""
