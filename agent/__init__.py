"""zk0 agent."""
