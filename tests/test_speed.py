"""Speed measured so the machine's load cannot move it: runs interleaved video by video, medians of paired
ratios with their spread; memory labelled for what it is. Fake samplers whose cost is known stand in for models."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dmd.evaluation import evaluate as ev
from dmd.evaluation.metrics import paired_speedup, quartiles

STEP_SECONDS = 0.004


class Load:
    """The machine: every `period` denoise calls its load flips between 1× and 4× (other jobs come and go)."""

    def __init__(self, period: int):
        self.calls, self.period = 0, period

    def factor(self) -> float:
        self.calls += 1
        return 4.0 if (self.calls // self.period) % 2 else 1.0


class Counted(torch.nn.Module):
    def forward(self, hidden_states):
        return hidden_states


class FakeSampler:
    """`steps` transformer passes, each costing STEP_SECONDS times the machine's load at that moment."""

    def __init__(self, transformer: torch.nn.Module, steps: int, load: Load):
        self.transformer, self.steps, self.guidance, self.load = transformer, steps, 1.0, load

    def encode(self, prompt: str) -> dict:
        return {}

    def denoise(self, embeds, noise_BCTHW, seed):
        factor = self.load.factor()
        for _ in range(self.steps):
            noise_BCTHW = self.transformer(noise_BCTHW)
            time.sleep(STEP_SECONDS * factor)
        return noise_BCTHW


def _decode(latents: torch.Tensor) -> np.ndarray:
    return np.zeros((1, 1, 2, 2, 3), dtype=np.uint8)


def test_interleaved_runs_give_the_true_ratio_under_a_changing_load():
    load = Load(period=7)
    shared = Counted()  # the two teacher runs share one transformer, as they share one pipeline
    samplers = {
        "teacher_full": FakeSampler(shared, 12, load),
        "teacher_few": FakeSampler(shared, 3, load),
        "student": FakeSampler(Counted(), 3, load),
    }
    items = ev.eval_items(["a", "b", "c", "d"], seed=0, num_seeds=3)
    runs = ev.run_samplers(samplers, _decode, items, (1, 1, 1, 1, 1), torch.device("cpu"), 1, progress=False)
    assert [runs[n].speed.nfe for n in ev.RUNS] == [12, 3, 3]  # each run counts only its own passes
    full, student = runs["teacher_full"].speed.per_video, runs["student"].speed.per_video
    q1, median, q3 = paired_speedup(full, student, "dit")
    assert median == pytest.approx(4.0, rel=0.1)  # 12 passes against 3, whatever the load
    assert q1 <= median <= q3
    # the same videos timed one run after the other see different loads: their ratio of medians is off
    sequential_full = [v["dit"] for v in full]
    assert max(sequential_full) / min(sequential_full) > 2  # the load did change during the evaluation


def test_quartiles_and_paired_speedup():
    assert quartiles([1.0, 2.0, 3.0, 4.0, 100.0]) == (2.0, 3.0, 4.0)  # an outlier moves neither
    base = [
        {"dit": 10.0, "vae_decode": 1.0},
        {"dit": 20.0, "vae_decode": 1.0},
        {"dit": 40.0, "vae_decode": 1.0},
    ]
    run = [{"dit": 1.0, "vae_decode": 1.0}, {"dit": 2.0, "vae_decode": 1.0}, {"dit": 4.0, "vae_decode": 1.0}]
    assert paired_speedup(base, run, "dit") == (10.0, 10.0, 10.0)
    assert paired_speedup(base, run, None)[1] == pytest.approx(21.0 / 3.0)
    with pytest.raises(ValueError, match="the same videos"):
        paired_speedup(base, run[:2], "dit")


def test_the_report_says_what_its_memory_figures_are(tiny_params, tmp_path):
    from test_evaluate import _synthetic_runs

    items, runs = _synthetic_runs(tiny_params, tmp_path)
    for name, mb in (("teacher_full", 30.0), ("teacher_few", 30.0), ("student", 30.0)):
        runs[name].speed.weights_mb = mb
    metrics = ev.score_runs(tiny_params, items, runs, torch.device("cpu"))
    text = ev.write_outputs(tiny_params, items, runs, metrics).read_text()
    assert "| transformer weights MiB | peak working memory MiB |" in text
    assert "not weights" in text and "Times are medians per video" in text
    assert Path(tiny_params.evaluate.report_dir, ev.DETAILS).is_file()
