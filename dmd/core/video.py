"""Video files: one reader (decord, or PyAV where decord has no wheel) and one H.264 writer."""

from __future__ import annotations

import functools
from pathlib import Path

import av
import numpy as np

from dmd.core.io import atomic_path

try:  # decord has no wheels for ARM Linux or Apple silicon
    import decord

    decord.bridge.set_bridge("native")
except ImportError:  # pragma: no cover - exercised only where decord is missing
    decord = None


class VideoReadError(RuntimeError):
    """A file that is not a readable video; the message says why."""


def video_info(path: str | Path) -> tuple[int, int, int, float]:
    """(frames, height, width, fps) of a video file."""
    path = Path(path)
    _check_file(path)
    if decord is not None:
        try:
            vr = decord.VideoReader(str(path), num_threads=1)
            h, w = vr[0].shape[:2]
            return len(vr), h, w, float(vr.get_avg_fps())
        except Exception:  # decord rejects some valid sizes (widths 16, 24, 48, ...); PyAV decides
            pass
    frames = _read_pyav(path)
    try:
        with av.open(str(path)) as c:
            fps = float(c.streams.video[0].average_rate or 0)
    except Exception as e:
        raise VideoReadError(f"{path}: cannot decode ({_why(e)})") from e
    return frames.shape[0], frames.shape[1], frames.shape[2], fps


def read_video(path: str | Path, indices: list[int] | None = None) -> np.ndarray:
    """Frames as uint8 (T, H, W, 3); `indices` selects frames (all when None)."""
    path = Path(path)
    _check_file(path)
    frames = None
    if decord is not None:
        try:
            vr = decord.VideoReader(str(path), num_threads=1)
            idx = list(range(len(vr))) if indices is None else list(indices)
            if idx and max(idx) >= len(vr):
                raise VideoReadError(f"{path}: has {len(vr)} frames, frame {max(idx)} was asked for")
            return vr.get_batch(idx).asnumpy()
        except VideoReadError:
            raise
        except Exception:  # decord rejects some valid sizes (widths 16, 24, 48, ...); PyAV decides
            pass
    frames = _read_pyav(path)
    if indices is not None:
        if max(indices) >= len(frames):
            raise VideoReadError(f"{path}: has {len(frames)} frames, frame {max(indices)} was asked for")
        frames = frames[list(indices)]
    return frames


def _read_pyav(path: Path) -> np.ndarray:
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as e:
        raise VideoReadError(f"{path}: cannot decode ({_why(e)})") from e
    if not frames:
        raise VideoReadError(f"{path}: no video frames")
    return np.stack(frames)


def _why(e: Exception) -> str:
    text = str(e).splitlines()[0][:120] if str(e) else ""
    return f"{e.__class__.__name__}: {text}"


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8, crf: int = 12) -> Path:
    """Write uint8 (T, H, W, 3) frames as an H.264 mp4 (yuv420p), atomically. Sizes must be even."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    t, h, w, _ = frames.shape
    path = Path(path)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            # one encoder thread (threaded lookahead is not deterministic) and no AVX-512 kernels: with those,
            # the same frames gave different files from one write to the next
            stream.options = {
                "crf": str(crf),
                "preset": "medium",
                "x264-params": ":".join(["threads=1", "lookahead-threads=1", *_x264_asm()]),
            }
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    return path


@functools.lru_cache(maxsize=1)
def _x264_asm() -> list[str]:
    """x264's `asm` option: its AVX2 kernels on a CPU with AVX-512 (every such CPU has AVX2, FMA3 and BMI2),
    else nothing, so x264 picks its kernels itself. x264 does not check a given list against the CPU, so the
    list is only given where /proc/cpuinfo shows the CPU has it."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return []
    return ["asm=AVX2,BMI2"] if " avx512f " in flags.replace("\n", " ") else []


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoReadError(f"{path}: no such file")
    if not path.is_file():
        raise VideoReadError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise VideoReadError(f"{path}: empty file (0 bytes)")
