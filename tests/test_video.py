"""One video reader for every platform: what the writer wrote reads back, at sizes decord alone rejects too."""

import numpy as np
import pytest

from dmd.core.video import VideoReadError, read_video, video_info, write_video


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


# x264 run-to-run differences showed up once the heap held other data, e.g. after decoding a video; each process
# therefore reads every clip back between writes, as the pipeline's stages do.
_WRITER = """
import sys
import numpy as np
from dmd.core.io import sha256_file
from dmd.core.video import read_video, write_video

folder, writes = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
for height, width in [(16, 16), (24, 24), (32, 40), (16, 48), (32, 32)]:
    frames = rng.integers(0, 256, (21, height, width, 3), dtype=np.uint8)
    hashes = set()
    for _ in range(writes):
        path = write_video(f"{folder}/{height}x{width}.mp4", frames)
        hashes.add(sha256_file(path))
        read_video(path)
    print(f"{height}x{width}", *sorted(hashes))
"""


def test_the_same_frames_give_the_same_mp4_bytes_in_every_process(tmp_path):
    import subprocess
    import sys

    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        done = subprocess.run(
            [sys.executable, "-c", _WRITER, str(tmp_path / name), "8"],
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(dict(line.split(" ", 1) for line in done.stdout.splitlines()))
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) == 5
    for size, hashes in runs[0].items():
        assert len(hashes.split()) == 1, f"{size}: one process wrote {len(hashes.split())} different files"
        assert runs[1][size] == hashes, f"{size}: one file in one process, another in the other"
