"""decoder="auto"'s choice (vitssl.video.reader_choice): the faster reader by the figures, cached per machine key.

The measurement is injected (figures, not timings), so every test is deterministic.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from vitssl.video import reader_choice
from vitssl.video.reader_choice import cache_path, choose_reader, pick

BOTH = ["torchcodec", "pyav"]


class FakeMeasure:
    """Returns the given clips/s and records each call's candidates."""

    def __init__(self, figures: dict[str, float]) -> None:
        self.figures = figures
        self.calls: list[list[str]] = []

    def __call__(self, candidates):
        self.calls.append(list(candidates))
        return {name: fps for name, fps in self.figures.items() if name in candidates}


def _fail(candidates):
    raise AssertionError("measured although the choice is known")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache folder and no choice memoised in this process; the file auto writes."""
    monkeypatch.setenv("VITSSL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(reader_choice, "_MEMO", {})
    return tmp_path / "cache" / "video_readers.json"


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("VITSSL_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_path() == tmp_path / "home" / ".cache" / "vitssl" / "video_readers.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_path() == tmp_path / "xdg" / "vitssl" / "video_readers.json"
    monkeypatch.setenv("VITSSL_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_path() == tmp_path / "mine" / "video_readers.json"


def test_the_faster_reader_wins_and_near_ties_go_to_the_preferred_one():
    assert pick({"torchcodec": 10.0, "pyav": 20.0}, BOTH) == "pyav"
    assert pick({"torchcodec": 20.0, "pyav": 10.0}, BOTH) == "torchcodec"
    assert pick({"torchcodec": 10.0, "pyav": 10.5}, BOTH) == "torchcodec"  # within 10 %: noise, not a winner
    assert pick({"torchcodec": 10.0, "pyav": 11.5}, BOTH) == "pyav"
    assert pick({"pyav": 1.0}, BOTH) == "pyav"


@pytest.mark.parametrize(
    ("figures", "winner"), [({"torchcodec": 10, "pyav": 20}, "pyav"), ({"torchcodec": 30, "pyav": 20}, "torchcodec")]
)
def test_auto_picks_the_faster_and_caches_it(cache, figures, winner):
    measure = FakeMeasure(figures)
    choice = choose_reader(BOTH, measure)
    assert (choice.reader, choice.source, measure.calls) == (winner, "measured", [BOTH])
    assert choice.figures == {k: float(v) for k, v in sorted(figures.items(), key=lambda kv: -kv[1])}
    (entry,) = json.loads(cache.read_text())["entries"]
    assert entry["reader"] == winner and entry["key"] == reader_choice.machine_key(BOTH)
    assert set(entry["key"]) >= {"readers", "ffmpeg", "cpu", "cores", "method"}
    assert set(entry["key"]["readers"]) == set(BOTH)
    assert choose_reader(BOTH, _fail) is choice  # this process remembers it
    reader_choice.forget()  # a new process: the file answers
    again = choose_reader(BOTH, _fail)
    assert (again.reader, again.source, again.figures, again.cache_file) == (
        winner,
        "cache",
        choice.figures,
        str(cache),
    )
    assert winner in again.describe() and "from the cache" in again.describe()


def test_the_cache_is_keyed_by_machine_and_reader_versions(cache, monkeypatch):
    choose_reader(BOTH, FakeMeasure({"torchcodec": 10, "pyav": 20}))
    facts = reader_choice._machine_facts()
    reader_choice.forget()
    # another kind of node sharing the home folder: measured again, both entries kept
    monkeypatch.setattr(reader_choice, "_FACTS", {**facts, "cpu": "Another CPU", "cores": 64})
    other = FakeMeasure({"torchcodec": 30, "pyav": 20})
    assert choose_reader(BOTH, other).reader == "torchcodec" and other.calls == [BOTH]
    entries = json.loads(cache.read_text())["entries"]
    assert [(e["key"]["cpu"], e["reader"]) for e in entries] == [(facts["cpu"], "pyav"), ("Another CPU", "torchcodec")]
    # a new reader version is another key too
    reader_choice.forget()
    monkeypatch.setattr(reader_choice, "_FACTS", facts)
    assert choose_reader(BOTH, _fail).reader == "pyav"  # the first machine's entry still answers
    real_version = reader_choice.importlib.metadata.version
    monkeypatch.setattr(reader_choice.importlib.metadata, "version", lambda p: "99.0" if p == "av" else real_version(p))
    reader_choice.forget()
    newer = FakeMeasure({"torchcodec": 30, "pyav": 20})
    assert choose_reader(BOTH, newer).reader == "torchcodec" and newer.calls == [BOTH]


@pytest.mark.parametrize(
    "content", ["{not json", '["a list"]', '{"entries": [{"key": 1, "reader": "pyav", "figures": {}}]}', "\x00\x01"]
)
def test_a_broken_cache_is_ignored_and_rewritten(cache, content, caplog):
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    measure = FakeMeasure({"torchcodec": 10, "pyav": 20})
    with caplog.at_level(logging.WARNING):
        assert choose_reader(BOTH, measure).reader == "pyav"
    assert measure.calls == [BOTH]
    (entry,) = json.loads(cache.read_text())["entries"]  # valid JSON again, the one good entry
    assert entry["reader"] == "pyav"
    if content.startswith(("{not", '["', "\x00")):
        assert "ignoring the video reader cache" in caplog.text


def test_a_cached_reader_that_no_longer_loads_is_not_chosen(cache):
    choose_reader(BOTH, FakeMeasure({"torchcodec": 30, "pyav": 20}))
    reader_choice.forget()
    # torchcodec gone (FFmpeg removed): pyav is the only candidate, whatever the cache says
    choice = choose_reader(["pyav"], _fail)
    assert (choice.reader, choice.source) == ("pyav", "only")


def test_a_reader_that_fails_the_measurement_is_never_chosen(cache):
    # torchcodec is preferred, but it did not read the sample (left out of the figures)
    choice = choose_reader(BOTH, FakeMeasure({"pyav": 5.0}))
    assert (choice.reader, choice.figures) == ("pyav", {"pyav": 5.0})


def test_a_failed_measurement_falls_back_without_caching(cache, caplog):
    calls = []

    def broken(candidates):
        calls.append(1)
        raise RuntimeError("no encoder")

    with caplog.at_level(logging.WARNING):
        choice = choose_reader(BOTH, broken)
    assert (choice.reader, choice.source) == ("torchcodec", "fallback") and "no encoder" in choice.describe()
    assert not cache.exists() and "video readers not measured" in caplog.text
    assert choose_reader(BOTH, broken) is choice and calls == [1]  # not retried on every read


def test_an_unwritable_cache_folder_still_chooses(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("VITSSL_CACHE_DIR", str(blocker))  # a file where the folder should be
    monkeypatch.setattr(reader_choice, "_MEMO", {})
    with caplog.at_level(logging.WARNING):
        choice = choose_reader(BOTH, FakeMeasure({"torchcodec": 10, "pyav": 20}))
    assert (choice.reader, choice.source, choice.cache_file) == ("pyav", "measured", None)
    assert "VITSSL_CACHE_DIR" in caplog.text and "not cached" in choice.describe()


def test_cached_choice_never_measures(cache):
    assert reader_choice.cached_choice(BOTH) is None and not cache.exists()
    assert reader_choice.cached_choice(["pyav"]).reader == "pyav"
    choose_reader(BOTH, FakeMeasure({"torchcodec": 10, "pyav": 20}))
    assert reader_choice.cached_choice(BOTH).reader == "pyav"


def test_the_measurement_times_each_reader_and_leaves_out_one_that_fails():
    resets, reads = [], []

    def read(path, indices, name):
        indices = list(indices)
        reads.append((name, len(indices)))
        if name == "broken":
            raise RuntimeError("cannot decode")
        assert Path(path).is_file()
        return indices

    figures = reader_choice.measure_clip_speeds(
        ["fast", "broken", "slow"], read, lambda: resets.append(1), clips=3, rounds=2
    )
    assert set(figures) == {"fast", "slow"} and all(v > 0 for v in figures.values())
    assert len(resets) == 2 * 3 * 2  # a reset (decoders closed) before each timed clip: 2 readers x 3 clips x 2 rounds
    assert ("fast", 8) in reads and ("broken", 1) in reads and ("broken", 8) not in reads


def test_readers_starting_together_measure_once(cache):
    # DataLoader workers resolving auto at once: one measures under the lock, the others then read its result
    started, release, calls, results = threading.Event(), threading.Event(), [], {}

    def slow(candidates):
        calls.append(list(candidates))
        started.set()
        release.wait(10)
        return {"torchcodec": 10.0, "pyav": 20.0}

    first = threading.Thread(target=lambda: results.setdefault("first", choose_reader(BOTH, slow)))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: results.setdefault("second", choose_reader(BOTH, slow)))
    second.start()
    time.sleep(0.2)  # the second is waiting for the lock (or, if slower, finds the first's result)
    release.set()
    first.join(10)
    second.join(10)
    assert calls == [BOTH] and results["first"].reader == results["second"].reader == "pyav"
