"""zk0 bench."""
