"""Run one agent's adapter subscriber on its own until SIGTERM or Ctrl-C.

    python -m zk0.agent.distribution --config agent.yaml [--events FILE]

``--events`` appends one JSON line per version handed to the (absent) inference engine, for
monitoring and tests; with no engine, the status reports no version in use. The
``--throttle-s``/``--stage-delay-s`` options are fault-test hooks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from zk0.agent.distribution.subscriber import AdapterSubscriber, OnNewVersion, SubscriberOptions
from zk0.shared.artifact import Manifest
from zk0.shared.config import ConfigError, load_agent_config
from zk0.shared.distribution.keys import KeyFileError
from zk0.shared.logs import new_run_dir, setup_logging


def _events_writer(path: Path | None) -> OnNewVersion:
    def write(version: int, folder: Path, manifest: Manifest) -> None:
        if path is None:
            return
        line = {
            "version": version,
            "artifact_id": manifest.artifact_id,
            "pid": os.getpid(),
            "t": time.time(),
        }
        with path.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    return write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zk0.agent.distribution", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="agent.yaml")
    parser.add_argument("--events", type=Path, help="append a JSON line per version taken")
    parser.add_argument("--chunk-bytes", type=int, default=SubscriberOptions.chunk_bytes)
    parser.add_argument("--credit", type=int, default=SubscriberOptions.credit)
    parser.add_argument("--throttle-s", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--stage-delay-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        config = load_agent_config(args.config)
        setup_logging(new_run_dir(), "agent", config.agent_id)
        options = SubscriberOptions(
            chunk_bytes=args.chunk_bytes,
            credit=args.credit,
            throttle_s=args.throttle_s,
            stage_delay_s=args.stage_delay_s,
        )
        subscriber = AdapterSubscriber.from_config(
            config, on_new_version=_events_writer(args.events), options=options
        )
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        subscriber.start()
    except (ConfigError, KeyFileError, ValueError, OSError) as error:
        sys.stderr.write(f"error: {error}\n")  # the one-line user error
        return 2
    try:
        while not stop.wait(1.0):
            pass
    finally:
        subscriber.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
