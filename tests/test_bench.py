"""The benchmark's own bookkeeping: the start-up split from Progress events, and P2's peft check."""
from __future__ import annotations

import sys
import time

from bench import startup
from bench.reference import peft_missing
from trainer.events import Progress


def test_phase_clock_splits_start_up_in_event_order(monkeypatch):
    """Two "loading" events (Start, bundle handed over), caching, step 0, steps 1-2: each mark and peak in place."""
    rss = iter(range(10**6, 10**9, 1000))
    monkeypatch.setattr(startup, "rss_bytes", lambda: next(rss))  # before the sampler thread starts
    clock = startup.PhaseClock(interval=0.001)
    events = [("loading", 0), ("loading", 0), ("caching", 0), ("caching", 0), ("training", 0),
              ("training", 1), ("training", 1), ("training", 2)]
    for phase, step in events:
        clock(Progress(phase=phase, step=step))
        time.sleep(0.01)
    clock.close()
    m = clock.marks
    assert m["started"] < m["loaded"] < m["cache"] < m["train"] < m["step1"]
    assert set(clock.peaks) >= {"load", "build", "cache", "training"}
    assert clock.peaks["training"] > clock.peaks["cache"] > clock.peaks["load"]  # the RSS stub only grows
    assert sorted(clock.steps) == [0, 1, 2]  # the repeated step-1 event ("saved ...") is not a step


def test_split_arithmetic():
    marks = {"started": 1.0, "loaded": 3.0, "cache": 3.5, "train": 7.5, "step1": 8.25}
    got = startup.split(marks, images=4)
    assert got == {"load_s": 2.0, "build_s": 0.5, "cache_s": 4.0, "cache_per_image_s": 1.0,
                   "first_step_s": 0.75, "start_to_first_step_s": 7.25}


def test_split_without_caching_events_counts_no_cache_time():
    got = startup.split({"started": 0.0, "loaded": 1.0, "train": 2.0, "step1": 3.0}, images=2)
    assert got["cache_s"] == 0.0 and got["build_s"] == 1.0


def test_peft_missing_names_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    why = peft_missing()
    assert why is not None and "peft" in why and "requirements/bench.txt" in why
