"""Data layer: task registry and templates, row formats of the real datasets, parsers, loaders,
the per-run split protocol and prompts. Fixture rows under tests/fixtures/data mimic the real
Hugging Face datasets' rows (same field names and types)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ia2dist.config import DataConfig
from ia2dist.data import loaders, parsers, prompts, splits
from ia2dist.data.loaders import TaskData, load_eval_items, load_task, read_rows
from ia2dist.data.splits import dev_demos, eval_demos, make_split, train_demos
from ia2dist.data.tasks import (REMAP_WORDS, TASKS, cut_at_word, cut_like_reference,
                                get_task)
from ia2dist.errors import DataError, IA2Error, RowError
from ia2dist.records import Example

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"
PAPER_TASKS = ("sst2", "agnews", "finsen", "poems", "bbcnews", "sciq_remap", "qasc_remap",
               "strategytf", "gsm8k", "gsm8ks", "hmath_algebra", "sciqa")


def fixture(name: str) -> str:
    return str(FIXTURES / name)


def local_cfg(task: str, train: str, eval_: str | None = None, **kw) -> DataConfig:
    return DataConfig(task=task, train_path=fixture(train),
                      eval_path=fixture(eval_) if eval_ else None, **kw)


def make_pool(k: int) -> list[Example]:
    return [Example(uid=f"ex{i}", query=f"Text:item {i}\nLabel:", answer=str(i % 2),
                    label_index=i % 2) for i in range(k)]


# ----------------------------------------------------------------------------------------------
# Registry


def test_registry_has_the_paper_tasks_and_synthetic():
    packaged = {n for n, s in TASKS.items() if s.builder is not None}
    assert packaged == {"country_region", "capital_region", "country_language", "country_capital", "country_demonym",
                        "word_sentiment", "word_syllables"}
    assert all(TASKS[n].source and not TASKS[n].hf_path for n in packaged)
    assert set(TASKS) == set(PAPER_TASKS) | {"synthetic"} | packaged
    long_form = {"gsm8k", "gsm8ks", "hmath_algebra", "sciqa"}
    for name in PAPER_TASKS:
        spec = TASKS[name]
        assert spec.max_new_tokens == (200 if name in long_form else 1), name
        assert spec.single_token == (name not in long_form)
        assert spec.hf_path and spec.eval_split and spec.fields
        assert (spec.labels is None) == (name in long_form)
    assert {n for n, s in TASKS.items() if s.eval_only} == {"poems", "bbcnews", "gsm8ks"}
    synthetic = TASKS["synthetic"]
    assert synthetic.kind == "synthetic" and synthetic.labels is None
    assert synthetic.max_new_tokens == 1


def test_registry_sources_and_labels_match_the_protocol():
    expect = {
        "sst2": ("stanfordnlp/sst2", None, "train", "validation"),
        "agnews": ("fancyzhx/ag_news", None, "train", "test"),
        "finsen": ("takala/financial_phrasebank", "sentences_50agree", "train", "train"),
        "poems": ("google-research-datasets/poem_sentiment", None, None, "train"),
        "bbcnews": ("SetFit/bbc-news", None, None, "test"),
        "sciq_remap": ("allenai/sciq", None, "train", "validation"),
        "qasc_remap": ("allenai/qasc", None, "train", "validation"),
        "strategytf": ("wics/strategy-qa", None, "test", "test"),
        "gsm8k": ("openai/gsm8k", "main", "train", "test"),
        "gsm8ks": ("apple/GSM-Symbolic", "main", None, "test"),
        "hmath_algebra": ("EleutherAI/hendrycks_math", "algebra", "train", "test"),
        "sciqa": ("allenai/sciq", None, "train", "validation"),
    }
    for name, source in expect.items():
        spec = TASKS[name]
        assert (spec.hf_path, spec.hf_name, spec.train_split, spec.eval_split) == source, name
    assert TASKS["sst2"].labels == ("0", "1") and TASKS["agnews"].labels == ("0", "1", "2", "3")
    assert TASKS["bbcnews"].labels == TASKS["agnews"].labels
    assert TASKS["sciq_remap"].labels == ("apple", "Friday", "banana", "Saturday")
    assert TASKS["qasc_remap"].labels == ("apple", "Friday", "banana", "Saturday", "Thursday",
                                          "Sunday", "Wednesday", "Monday")
    assert TASKS["strategytf"].labels == ("0", "1")
    assert TASKS["finsen"].eval_from_train_tail and TASKS["strategytf"].eval_from_train_tail


def test_unknown_task_is_a_data_error_listing_known_tasks():
    with pytest.raises(DataError, match=r"unknown task 'imdb'.*sst2"):
        get_task("imdb")
    with pytest.raises(DataError, match="unknown task"):
        load_task(DataConfig(task="imdb"))


# ----------------------------------------------------------------------------------------------
# Templates and row formats


def test_classification_template_exact():
    ex = TASKS["sst2"].row_to_example({"idx": 3, "sentence": "a sometimes tedious film . ",
                                       "label": 0}, "u", np.random.RandomState(0))
    assert ex.query == "Text:a sometimes tedious film . \nLabel:"
    assert ex.answer == "0" and ex.label_index == 0
    assert ex.demo() == "Text:a sometimes tedious film . \nLabel:0"


def test_qa_template_and_strategy_answers():
    spec = TASKS["strategytf"]
    yes = spec.row_to_example({"question": "Is it common to see frost?", "answer": True}, "u", None)
    no = spec.row_to_example({"question": "Could a llama fly?", "answer": False}, "u", None)
    assert yes.query == "Question:Is it common to see frost?\nAnswer:"
    assert (yes.answer, yes.label_index, no.answer, no.label_index) == ("1", 1, "0", 0)


def test_sciq_mcq_template_and_remap():
    row = json.loads((FIXTURES / "sciq_train.jsonl").read_text().splitlines()[3])
    ex = TASKS["sciq_remap"].row_to_example(row, "u", np.random.RandomState(7))
    lines = ex.query.split("\n")
    assert lines[0] == "Question:What is the least dangerous radioactive decay?"
    assert lines[1] == "Choices:"
    tags = [line[1:line.index("]")] for line in lines[2:6]]
    options = [line[line.index("]") + 1:] for line in lines[2:6]]
    assert tags == ["apple", "Friday", "banana", "Saturday"]
    assert sorted(options) == sorted(["beta decay", "gamma decay", "zeta decay", "alpha decay"])
    assert ex.query.endswith("\n\nAnswer:") and lines[6] == "" and lines[7] == "Answer:"
    assert options[ex.label_index] == "alpha decay"
    assert ex.answer == REMAP_WORDS[ex.label_index] == ex.meta["gold"]


def test_sciq_option_order_is_seeded_and_varies_across_rows():
    cfg = local_cfg("sciq_remap", "sciq_train.jsonl", "sciq_train.jsonl")
    first, second = load_task(cfg), load_task(cfg)
    assert [e.query for e in first.train_pool] == [e.query for e in second.train_pool]
    positions = {e.label_index for e in first.train_pool}
    assert len(positions) > 1, "the correct answer should not always sit at the same position"


def test_qasc_eight_choices_in_dataset_order():
    items = load_eval_items("qasc_remap", fixture("qasc_validation.json"), DataConfig())
    by_q = {e.query.split("\n")[0]: e for e in items}
    ex = by_q["Question:Where do beads of water come from?"]
    assert ex.query == (
        "Question:Where do beads of water come from?\nChoices:\n[apple]Too much water\n"
        "[Friday]underground systems\n[banana]When the water is too cold\n[Saturday]Water spills\n"
        "[Thursday]Vapor turning into a liquid\n[Sunday]Warm air moving into cold air\n"
        "[Wednesday]At the peak of a mountain\n[Monday]To another location like underground\n"
        "\nAnswer:")
    assert ex.answer == "Thursday" and ex.label_index == 4


def test_finsen_drops_neutral_and_remaps_positive():
    rows = read_rows(fixture("finsen.jsonl"))
    data = load_task(local_cfg("finsen", "finsen.jsonl", max_eval=3))
    examples = data.train_pool + data.eval_items
    assert len(examples) == sum(r["label"] != 1 for r in rows)
    text_to_label = {f"Text:{r['sentence']}\nLabel:": r["label"] for r in rows}
    for ex in examples:
        assert {0: "0", 2: "1"}[text_to_label[ex.query]] == ex.answer
    assert len(data.eval_items) == 3
    assert not {e.uid for e in data.train_pool} & {e.uid for e in data.eval_items}


def test_strategytf_last_rows_after_shuffle_are_eval():
    cfg = local_cfg("strategytf", "strategyqa_test.jsonl", max_eval=4)
    data = load_task(cfg)
    assert (len(data.train_pool), len(data.eval_items)) == (6, 4)
    located = [(str(i), row) for i, row in enumerate(read_rows(cfg.train_path))]
    everything = loaders.to_examples(data.spec, located, "train", 42, None)
    # the last 4 after the shuffle evaluate, each part shuffled once more
    assert sorted(e.uid for e in data.eval_items) == sorted(e.uid for e in everything[-4:])
    assert sorted(e.uid for e in data.train_pool) == sorted(e.uid for e in everything[:-4])
    again = loaders.shuffled_order(6, 42)
    assert data.train_pool == [everything[:-4][i] for i in again]


def test_bbcnews_cut_and_agnews_label_ids():
    rows = read_rows(fixture("bbcnews_test.jsonl"))
    items = load_eval_items("bbcnews", fixture("bbcnews_test.jsonl"),
                            DataConfig(task="agnews", bbc_cut="word"))
    expected = {"business": "2", "sport": "1", "tech": "3", "politics": "0", "entertainment": "0"}
    for ex in items:
        text = ex.query[len("Text:"):-len("\nLabel:")]
        row = next(r for r in rows if r["text"].startswith(text))
        assert ex.answer == expected[row["label_text"]]
        assert len(text) <= 256
        if len(row["text"]) > 256:
            assert row["text"][len(text)] == " ", "cut must fall at a word boundary"
        else:
            assert text == row["text"]


def test_cut_like_reference():
    assert cut_like_reference("alpha beta gamma", 100) == "alpha beta"
    assert cut_like_reference("alpha beta gamma", 10) == "alpha"
    assert cut_like_reference("alpha beta gamma", 8) == "alpha"
    assert cut_like_reference("alphabetagamma", 5) == ""


def test_cut_at_word():
    assert cut_at_word("alpha beta gamma", 100) == "alpha beta gamma"
    assert cut_at_word("alpha beta gamma", 8) == "alpha"
    assert cut_at_word("alpha beta gamma", 10) == "alpha beta"
    assert cut_at_word("alphabetagamma", 5) == "alpha"


def test_poems_keeps_positive_and_negative_only():
    items = load_eval_items("poems", fixture("poems_train.jsonl"), DataConfig())
    assert len(items) == 4 and {e.answer for e in items} == {"0", "1"}


def test_reasoning_answers_are_full_solutions():
    gsm = load_task(local_cfg("gsm8k", "gsm8k_train.jsonl", "gsm8k_train.jsonl"))
    ex = next(e for e in gsm.train_pool if "Tom earns" in e.query)
    assert ex.query.startswith("Question:Tom earns $18") and ex.query.endswith("\nAnswer:")
    assert ex.answer.endswith("#### 2280") and "<<18*40=720>>" in ex.answer
    assert ex.meta["gold"] == "2280" and ex.label_index is None
    math = load_task(local_cfg("hmath_algebra", "hmath_algebra_train.jsonl",
                               "hmath_algebra_train.jsonl"))
    assert sorted(e.meta["gold"] for e in math.train_pool) == ["6", "\\frac{1}{2}", "x-3"]
    sciqa = load_task(local_cfg("sciqa", "sciq_train.jsonl", "sciq_train.jsonl"))
    empty_support = next(e for e in sciqa.train_pool if "Kilauea" in e.query)
    assert empty_support.answer == "\n#### smoke and ash"
    decay = next(e for e in sciqa.train_pool if "radioactive decay" in e.query)
    assert decay.answer == ("All radioactive decay is dangerous to living things, but alpha decay "
                            "is the least dangerous.\n#### alpha decay")
    assert decay.meta["gold"] == "alpha decay"


# ----------------------------------------------------------------------------------------------
# Parsers


@pytest.mark.parametrize("text, expected", [
    ("She has 24 + 30 = <<24+30=54>>54 muffins.\nShe ends with 54 - 25 = <<54-25=29>>29.\n#### 29",
     "29"),
    ("Over 4 weeks that is 570 * 4 = $2,280.\n#### 2,280", "2280"),
    ("#### 12\n\nQuestion: next one #### 99", "99"),
    ("The total is 3 + 4 = 7 apples.\n#### $7.00", "7"),
    ("So the price is 18 * 2 = 36, giving \\boxed{36}.", "36"),
    ("He walks 3 miles a day for 5 days. The answer is 15 miles.", "15"),
    ("the answer is: 1,050.50 dollars", "1050.5"),
    ("First 12 / 4 = 3, then 3 * 2 = 6 cookies", "6"),
    ("The temperature drops to -4 degrees overnight.\n#### -4", "-4"),
    ("She had 10-5 = 5 left", "5"),
    ("I don't know.", ""),
    ("", ""),
])
def test_parse_gsm8k(text, expected):
    assert parsers.parse_gsm8k(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Subtracting 7 gives $2x = 12$, so $x = \\boxed{6}$.", "6"),
    ("$\\frac{(x-3)(x+3)}{x+3} = \\boxed{x - 3}$.", "x-3"),
    ("so $f(7) = \\boxed{\\dfrac{1}{2}}$.", "\\frac{1}{2}"),
    ("$\\boxed{\\tfrac{3}{4}}$", "\\frac{3}{4}"),
    ("First $\\boxed{2}$ is wrong; the answer is $\\boxed{\\left( 3, \\frac{1}{2} \\right)}$.",
     "\\left(3,\\frac{1}{2}\\right)"),
    ("The roots are $\\boxed{x^{2} + 1}$ and more text }", "x^{2}+1"),
    ("We get \\boxed{\\frac{1}{", ""),
    ("no boxed answer here", ""),
])
def test_parse_math(text, expected):
    assert parsers.parse_math(text) == expected


def test_parse_sciqa_and_labels():
    assert parsers.parse_sciqa("Mesophiles grow best in moderate temperature.\n#### mesophilic "
                               "organisms\n") == "mesophilic organisms"
    assert parsers.parse_sciqa("a #### b #### coriolis effect") == "coriolis effect"
    assert parsers.parse_sciqa("  alpha decay ") == "alpha decay"
    assert parsers.parse_label(" 1") == "1" and parsers.parse_label("banana\n") == "banana"
    assert TASKS["sciqa"].parse("Support text.\n#### exothermic") == "exothermic"
    assert TASKS["gsm8k"].parse("#### 1,000") == "1000"


# ----------------------------------------------------------------------------------------------
# Loaders


def test_read_rows_json_formats(tmp_path):
    rows = read_rows(fixture("agnews_test.json"))
    assert len(rows) == 6 and set(rows[0]) == {"text", "label"}
    plain = tmp_path / "rows.json"
    plain.write_text(json.dumps(rows))
    assert read_rows(plain) == rows
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({"meta": {"n": 6}, "train": rows, "test": rows[:2]}))
    assert read_rows(keyed) == rows


def test_parquet_rows_with_nested_choices(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = json.loads((FIXTURES / "qasc_validation.json").read_text())
    path = tmp_path / "qasc.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert read_rows(path)[1]["choices"]["label"] == list("ABCDEFGH")
    from_parquet = load_eval_items("qasc_remap", str(path), DataConfig())
    from_json = load_eval_items("qasc_remap", fixture("qasc_validation.json"), DataConfig())
    assert from_parquet == from_json


def test_load_task_shuffles_with_pool_seed_and_truncates():
    cfg = local_cfg("sst2", "sst2_train.jsonl", "sst2_validation.jsonl",
                    max_train_pool=10, max_eval=4)
    data = load_task(cfg)
    assert isinstance(data, TaskData) and data.labels == ("0", "1")
    assert len(data.train_pool) == 10 and len(data.eval_items) == 4
    assert data == load_task(cfg)
    assert [e.uid for e in data.train_pool] != [f"sst2:train:{i}" for i in range(10)]
    other = load_task(local_cfg("sst2", "sst2_train.jsonl", "sst2_validation.jsonl",
                                max_train_pool=10, max_eval=4, pool_seed=7))
    assert [e.uid for e in other.train_pool] != [e.uid for e in data.train_pool]
    assert all(e.uid.startswith("sst2:train:") for e in data.train_pool)
    assert all(e.uid.startswith("sst2:eval:") for e in data.eval_items)


def test_eval_only_task_cannot_be_trained():
    with pytest.raises(DataError, match=r"poems is evaluation-only.*train on sst2"):
        load_task(DataConfig(task="poems", train_path=fixture("poems_train.jsonl")))


def test_hub_failure_says_to_pass_local_paths(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'stanfordnlp/sst2' on the Hub (LocalEntryNotFound)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(IA2Error, match=r"stanfordnlp/sst2.*data.train_path"):
        load_task(DataConfig(task="sst2"))


def test_hub_rows_are_used_when_paths_are_none(monkeypatch):
    import datasets

    calls = []
    rows = read_rows(fixture("gsm8k_train.jsonl"))

    def fake_load(path, name=None, split=None):
        calls.append((path, name, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = load_task(DataConfig(task="gsm8k"))
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    assert len(data.train_pool) == 4 and data.train_pool[0].uid.startswith("gsm8k:train:")
    assert data.eval_items[0].uid.startswith("gsm8k:test:")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "sst2.jsonl"
    path.write_text('{"sentence": "fine", "label": 1}\n\n{"sentence": "broken", "label": \n')
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON .*fix or remove the line"):
        read_rows(path)
    path.write_text('{"sentence": "fine", "label": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=rf"{path}:2: expected a JSON object"):
        read_rows(path)


def test_missing_field_names_line_and_field(tmp_path):
    path = tmp_path / "sst2.jsonl"
    path.write_text('{"sentence": "fine", "label": 1}\n{"text": "wrong column", "label": 0}\n')
    cfg = DataConfig(task="sst2", train_path=str(path), eval_path=str(path))
    with pytest.raises(DataError, match=rf"{path}:2: field 'sentence' is missing"):
        load_task(cfg)


@pytest.mark.parametrize("row, field", [
    ({"sentence": "fine", "label": "positive"}, "label"),
    ({"sentence": "fine", "label": True}, "label"),
    ({"sentence": 17, "label": 1}, "sentence"),
    ({"sentence": "fine", "label": 5}, "label"),
])
def test_wrong_typed_field_names_row_and_field(tmp_path, row, field):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"data": [{"sentence": "ok", "label": 0}, row]}))
    with pytest.raises(DataError, match=rf"{path} row 1: field '{field}'"):
        load_eval_items("sst2", str(path), DataConfig())


def test_row_errors_for_mcq_and_reasoning_rows():
    rng = np.random.RandomState(0)
    qasc = json.loads((FIXTURES / "qasc_validation.json").read_text())[0]
    with pytest.raises(RowError, match="'choices'"):
        TASKS["qasc_remap"].row_to_example({**qasc, "choices": {"text": ["a"], "label": ["A"]}},
                                           "qasc:0", rng)
    with pytest.raises(RowError, match="'answerKey' is 'Z'"):
        TASKS["qasc_remap"].row_to_example({**qasc, "answerKey": "Z"}, "qasc:0", rng)
    with pytest.raises(RowError, match="'answer' should be a boolean"):
        TASKS["strategytf"].row_to_example({"question": "q?", "answer": "yes"}, "s:0", rng)
    with pytest.raises(RowError, match=r"'answer' has no final answer.*####"):
        TASKS["gsm8k"].row_to_example({"question": "q?", "answer": "no number here"}, "g:0", rng)
    with pytest.raises(RowError, match=r"'solution' has no final answer"):
        TASKS["hmath_algebra"].row_to_example({"problem": "p", "solution": "x = 3"}, "h:0", rng)


@pytest.mark.parametrize("content, message", [
    ("", "no rows"),
    ("\n\n", "no rows"),
])
def test_empty_files_are_rejected(tmp_path, content, message):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_rows(path)


def test_bad_files_are_rejected(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "rows.xlsx").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows(tmp_path / "rows.xlsx")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="no rows"):
        read_rows(tmp_path / "empty.json")
    (tmp_path / "two.json").write_text(json.dumps({"a": [{"x": 1}], "b": [{"x": 2}]}))
    with pytest.raises(DataError, match="no single list of rows"):
        read_rows(tmp_path / "two.json")
    (tmp_path / "bad.json").write_text('[{"x": 1},\n {"x": }]')
    with pytest.raises(DataError, match=r"bad.json:2: invalid JSON"):
        read_rows(tmp_path / "bad.json")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_rows(tmp_path / "bad.parquet")


def test_all_rows_filtered_is_a_data_error(tmp_path):
    path = tmp_path / "neutral.jsonl"
    path.write_text('{"sentence": "The meeting is on Monday .", "label": 1}\n')
    with pytest.raises(DataError, match="no usable evaluation rows"):
        load_eval_items("finsen", str(path), DataConfig())


def test_tail_split_needs_more_rows_than_max_eval():
    with pytest.raises(DataError, match="data.max_eval=500"):
        load_task(local_cfg("strategytf", "strategyqa_test.jsonl"))


def test_synthetic_task_uses_the_synthetic_family():
    pytest.importorskip("ia2dist.data.synthetic", reason="ia2dist/data/synthetic.py not present")
    cfg = DataConfig(task="synthetic", max_train_pool=40, max_eval=10)
    data = load_task(cfg)
    assert data.spec.kind == "synthetic" and data.labels and len(data.labels) >= 2
    assert (len(data.train_pool), len(data.eval_items)) == (40, 10)
    assert all(data.labels[e.label_index] == e.answer for e in data.train_pool)
    assert data == load_task(cfg)
    assert load_eval_items("synthetic", None, cfg) == data.eval_items


# ----------------------------------------------------------------------------------------------
# Splits


@pytest.mark.parametrize("n, expected_dev", [(2, 1), (4, 2), (8, 4), (32, 16), (128, 48)])
def test_split_sizes_and_disjointness(n, expected_dev):
    pool = make_pool(300)
    split = make_split(pool, n, run_seed=0)
    assert (len(split.train), len(split.dev)) == (n, expected_dev) == (n, splits.num_dev(n))
    assert len(split.pool) == 300 - n - expected_dev
    uids = [e.uid for e in split.train + split.dev + split.pool]
    assert sorted(uids) == sorted(e.uid for e in pool)


def test_split_follows_randomstate_permutation():
    pool = make_pool(50)
    split = make_split(pool, 8, run_seed=3)
    order = np.random.RandomState(3).permutation(50)
    assert [e.uid for e in split.train] == [f"ex{i}" for i in order[:8]]
    assert [e.uid for e in split.dev] == [f"ex{i}" for i in order[8:12]]
    assert make_split(pool, 8, run_seed=3) == split
    assert make_split(pool, 8, run_seed=4).train != split.train


def test_split_too_large_names_num_train_and_pool_size():
    with pytest.raises(DataError, match=r"data.num_train: N=8 needs 8 training \+ 4 dev.*only 10"):
        make_split(make_pool(10), 8, run_seed=0)
    make_split(make_pool(12), 8, run_seed=0)


def test_train_demos_continue_the_split_generator():
    """The demo shuffles continue the RandomState that drew the split (not a fresh one)."""
    split = make_split(make_pool(40), 8, run_seed=1)
    rng = np.random.RandomState(1)
    rng.permutation(40)
    first = [k for k in range(8) if k != 0]
    rng.shuffle(first)
    assert [d.uid for d in train_demos(split, 1)[0]] == [split.train[k].uid for k in first]
    with pytest.raises(DataError, match="data.max_icl_demos"):
        train_demos(split, 1, max_demos=0)


def test_leave_one_out_train_demos():
    split = make_split(make_pool(40), 8, run_seed=1)
    lists = train_demos(split, run_seed=1)
    assert len(lists) == 8
    for ex, demos in zip(split.train, lists):
        assert len(demos) == 7 and ex not in demos
        assert {d.uid for d in demos} == {e.uid for e in split.train} - {ex.uid}
    assert lists == train_demos(split, run_seed=1)
    orders = {tuple(sorted(range(7), key=lambda k: demos[k].uid)) for demos in lists}
    assert len(orders) > 1, "demo order should be shuffled per example"
    dev = dev_demos(split, lists)
    assert len(dev) == len(split.dev) == 4
    assert all(dev[j] == lists[j] for j in range(4))


def test_eval_demos_come_from_the_pool_only():
    split = make_split(make_pool(60), 8, run_seed=2)
    items = make_pool(5)
    demos = eval_demos(split.pool, items, 8, run_seed=2)
    pool_uids = {e.uid for e in split.pool}
    assert len(demos) == 5
    for lst in demos:
        assert len(lst) == 7 and len({d.uid for d in lst}) == 7
        assert {d.uid for d in lst} <= pool_uids
    assert demos == eval_demos(split.pool, items, 8, run_seed=2)
    assert demos != eval_demos(split.pool, items, 8, run_seed=3)


def test_eval_demos_errors_on_small_or_empty_pool():
    with pytest.raises(DataError, match="demo pool has only 0"):
        eval_demos([], make_pool(2), 4, run_seed=0)
    with pytest.raises(DataError, match="demo pool has only 2"):
        eval_demos(make_pool(2), make_pool(2), 4, run_seed=0)
    assert eval_demos([], make_pool(2), 1, run_seed=0) == [[], []]


def test_protocol_end_to_end_on_fixture_rows():
    data = load_task(local_cfg("sst2", "sst2_train.jsonl", "sst2_validation.jsonl"))
    split = make_split(data.train_pool, 4, run_seed=0)
    lists = train_demos(split, 0)
    prompt = prompts.teacher_prompt(lists[0], split.train[0])
    assert prompt.count("\n\n") == 3 and prompt.endswith(split.train[0].query)
    assert len(eval_demos(split.pool, data.eval_items, 4, 0)) == len(data.eval_items)


# ----------------------------------------------------------------------------------------------
# Prompts


def test_teacher_and_student_prompts_exact():
    a = Example("a", "Text:great film\nLabel:", "1")
    b = Example("b", "Text:dull plot\nLabel:", "0")
    q = Example("q", "Text:a charming journey\nLabel:", "1")
    assert prompts.teacher_prompt([a, b], q) == (
        "Text:great film\nLabel:1\n\nText:dull plot\nLabel:0\n\nText:a charming journey\nLabel:")
    assert prompts.teacher_prompt([], q) == q.query
    assert prompts.student_prompt(q) == "Text:a charming journey\nLabel:"
