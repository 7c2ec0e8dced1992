"""The agent side of adapter distribution: keep the local adapter store on the hub's newest
version (``python -m zk0.agent.distribution --config agent.yaml`` runs it on its own)."""
