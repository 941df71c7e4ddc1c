"""Video and camera frames in, annotated video out, with PyAV (FFmpeg's libraries; `pip install
'posellm-edge[video]'`).

PyAV rather than OpenCV: its wheels bundle FFmpeg with libx264, it reads and writes frames as numpy without a GUI
stack, gives each frame its presentation time, and reports corrupt or truncated data as exceptions (OpenCV's
VideoCapture returns `False` and leaves the reason in its log). Imported lazily: the image runtime does not need it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class Frame:
    index: int
    time: float  # seconds from the start of the stream
    rgb: np.ndarray  # [H, W, 3] uint8


def _av():
    try:
        import av
    except ImportError:
        raise InputError("video and camera input need PyAV: pip install 'posellm-edge[video]' (or: pip install av)"
                         ) from None
    return av


class VideoSource:
    """Frames of a video file or a camera, in order. `frames` is the container's frame count (None: unknown)."""

    def __init__(self, path: str | Path | None = None, camera: int | None = None) -> None:
        av = _av()
        self.name = f"camera {camera}" if camera is not None else str(path)
        self.is_camera = camera is not None
        try:
            if camera is not None:
                url, options = _camera_url(camera)
                self.container = av.open(url, **options)
            else:
                if not Path(path).is_file():
                    raise InputError(f"video file {str(path)!r} does not exist")
                self.container = av.open(str(path))
        except InputError:
            raise
        except (av.error.FFmpegError, OSError) as exc:
            what = "could not be opened" if camera is not None else "is not a readable video"
            raise InputError(f"{self.name} {what}: {exc}") from None
        if not self.container.streams.video:
            self.container.close()
            raise InputError(f"{self.name} has no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self.frames = int(self.stream.frames) or None
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.fps = float(rate) if rate else 25.0

    def __iter__(self) -> Iterator[Frame]:
        av = _av()
        index = 0
        try:
            for frame in self.container.decode(self.stream):
                t = float(frame.time) if frame.time is not None else index / self.fps
                yield Frame(index, t, frame.to_ndarray(format="rgb24"))
                index += 1
        except av.error.FFmpegError as exc:
            raise InputError(f"{self.name}: decoding failed after frame {index - 1} (corrupt or truncated "
                             f"video?): {exc}") from None
        if self.frames is not None and index < self.frames and not self.is_camera:
            raise InputError(f"{self.name}: the stream ended after {index} of its {self.frames} frames (truncated "
                             "video?)")

    def close(self) -> None:
        self.container.close()


def _camera_url(index: int) -> tuple[str, dict]:
    """av.open arguments for camera `index` on this platform (V4L2, AVFoundation, DirectShow)."""
    if sys.platform.startswith("linux"):
        return f"/dev/video{index}", {"format": "v4l2"}
    if sys.platform == "darwin":
        return str(index), {"format": "avfoundation"}
    return f"video={index}", {"format": "dshow"}


def open_camera(index: int) -> VideoSource:
    return VideoSource(camera=index)


class VideoSink:
    """An H.264 (libx264, else MPEG-4 Part 2) MP4 written to `<out>.part` and renamed on close, so `out` is always
    a complete file; after a failure the frames so far are still finalised into a playable video."""

    def __init__(self, out: str | Path, fps: float, width: int, height: int) -> None:
        av = _av()
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.with_name(self.out.name + ".part")
        self.container = av.open(str(self.tmp), mode="w", format="mp4")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.stream = self.container.add_stream(codec, rate=max(1, round(fps)))
        # yuv420p needs even sizes: an odd last row / column is dropped
        self.width, self.height = width - width % 2, height - height % 2
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.width, self.height, "yuv420p"
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        av = _av()
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:self.height, :self.width]), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        os.replace(self.tmp, self.out)
