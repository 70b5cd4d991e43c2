"""One video reader for every platform: what the writer wrote reads back, at sizes decord alone rejects too."""

import numpy as np
import pytest

from dmd.video import VideoReadError, read_video, video_info, write_video


@pytest.mark.parametrize("width", [16, 24, 32, 48])
def test_written_video_reads_back(tmp_path, width):
    rng = np.random.default_rng(0)
    frames = np.repeat(np.repeat(rng.integers(0, 256, (9, 4, width // 8, 3), dtype=np.uint8), 8, 1), 8, 2)
    path = write_video(tmp_path / "clip.mp4", frames, fps=8, crf=0)
    assert video_info(path)[:3] == (9, 32, width)
    back = read_video(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 8  # yuv420p chroma subsampling only
    np.testing.assert_array_equal(read_video(path, [0, 8]), back[[0, 8]])


def test_bad_files_name_the_path_and_reason(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(VideoReadError, match="empty.mp4: empty file"):
        read_video(empty)
    with pytest.raises(VideoReadError, match="notes.mp4: cannot decode"):
        read_video(text)
    with pytest.raises(VideoReadError, match="missing.mp4: no such file"):
        video_info(tmp_path / "missing.mp4")
