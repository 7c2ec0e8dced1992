"""``python -m zk0.hub.cli``: the ``zk0-hub`` command."""

from zk0.hub.cli import main

main()
