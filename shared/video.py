"""How an arm's camera streams are encoded into its dataset (``video:`` in the robot config).

The codecs are those LeRobot 0.6.1 encodes with PyAV's bundled FFmpeg and every build here
decodes; what each costs at real camera sizes is in ``bench/results/record.json``
(``zk0 bench record``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

VideoCodec = Literal["libsvtav1", "h264", "hevc"]


class VideoConfig(BaseModel):
    """Video encoding of recorded episodes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    codec: VideoCodec = Field(
        default="h264",
        description="h264 (keeps up with two 720x1280 cameras at 30 fps on 2 cores), libsvtav1 "
        "(AV1, LeRobot's default: smaller files; keeps up to 480x640 there) or hevc.",
    )
    streaming_encoding: bool = Field(
        default=True,
        description="Encode frames while they arrive, in threads of the recording process, so "
        "an episode saves in well under a second; false: stage PNGs and encode on save.",
    )
    encoder_threads: Annotated[int, Field(ge=1, le=64)] | None = Field(
        default=None, description="Threads per camera encoder (default: the codec decides)."
    )
    queue_s: Annotated[float, Field(gt=0, le=10)] = Field(
        default=1.0,
        description="Frames per camera that may wait for the encoder, in seconds of recording. "
        "An episode whose video misses a frame (the encoder fell behind) is dropped, not saved.",
    )
