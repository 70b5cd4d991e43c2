"""Atomic writes: equal content gives equal bytes in every process; a killed writer's temporaries can be told from
a running one's."""

from __future__ import annotations

import subprocess
import sys

from dmd.core.io import atomic_path, remove_stale_temporaries

_WRITE = """
import sys
import torch
from dmd.core.io import sha256_file, write_safetensors

metadata = {f"key{i}": str(i) for i in range(12)}
write_safetensors(sys.argv[1], {"b": torch.arange(6.0), "a": torch.ones(2, 3)}, metadata)
print(sha256_file(sys.argv[1]))
"""


def test_equal_tensors_and_metadata_give_equal_safetensors_bytes_in_every_process(tmp_path):
    from safetensors import safe_open

    hashes = {
        subprocess.run(
            [sys.executable, "-c", _WRITE, str(tmp_path / f"{i}.safetensors")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for i in range(3)
    }
    assert len(hashes) == 1, hashes  # safetensors orders its metadata differently in each process
    with safe_open(str(tmp_path / "0.safetensors"), framework="pt") as f:
        assert f.metadata() == {f"key{i}": str(i) for i in range(12)}
        assert f.get_tensor("b").tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


_KILLED_WHILE_WRITING = """
import os, signal, sys
from dmd.core.io import atomic_path

with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_only_temporaries_of_writers_that_are_gone_are_removed(tmp_path):
    (tmp_path / "sub").mkdir()
    subprocess.run([sys.executable, "-c", _KILLED_WHILE_WRITING, str(tmp_path / "sub" / "a.mp4")])
    (stale,) = (tmp_path / "sub").iterdir()
    assert stale.name.startswith(".a.mp4.") and ".tmp" in stale.name
    with atomic_path(tmp_path / "b.mp4") as running:
        running.write_text("being written")
        assert remove_stale_temporaries(tmp_path) == [stale]
        assert running.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["b.mp4", "sub"]
