"""``python -m zk0.cli``: the ``zk0`` command."""

from zk0.cli import main

main()
