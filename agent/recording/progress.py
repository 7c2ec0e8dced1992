"""A progress bar for recording (rich, on stderr), or nothing when disabled."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zk0.agent.recording.recorder import EpisodeSummary


class Progress:
    """Episodes done and frames of the current episode; a no-op when ``enabled`` is False."""

    def __init__(self, episodes: int, enabled: bool) -> None:
        self.episodes = episodes
        self.enabled = enabled
        self._progress: Any = None
        self._episodes_task: Any = None
        self._frames_task: Any = None

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._progress.__enter__()
            self._episodes_task = self._progress.add_task("episodes", total=self.episodes)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)
            self._progress = None

    def start_episode(self, index: int, frames: int) -> None:
        if self._progress is None:
            return
        if self._frames_task is not None:
            self._progress.remove_task(self._frames_task)
        self._frames_task = self._progress.add_task(f"episode {index} frames", total=frames)

    def frame(self) -> None:
        if self._progress is not None and self._frames_task is not None:
            self._progress.advance(self._frames_task)

    def end_episode(self, summary: EpisodeSummary) -> None:
        if self._progress is None:
            return
        if summary.saved:
            self._progress.advance(self._episodes_task)
