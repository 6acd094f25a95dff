"""protocol: reference reproduces the paper's code item for item.

The reference's algorithms (github.com/aamixsh/ia2, scripts/) are RESTATED here from their
behaviour, step by step as that code performs them (Hugging Face ``Dataset.shuffle`` and
``filter`` as the oracle of its data preparation, its ``RandomState`` calls for splits and demos,
its training loop's evaluation condition), and ia2dist's results are compared with them. Nothing
is imported from the reference.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from ia2dist.config import (PROTOCOL_DEFAULTS, DataConfig, RunConfig, TrainConfig,
                            label_type_for, label_types_for, load_config)
from ia2dist.data import parsers
from ia2dist.data.loaders import load_eval_items, load_ood_sets, load_task
from ia2dist.data.splits import dev_demos, eval_demos, make_split, train_demos
from ia2dist.data.targets import target_ids
from ia2dist.data.tasks import REMAP_VOCABULARY, REMAP_WORDS, TASKS, draw_remap_words
from ia2dist.errors import ConfigError, IA2Error
from ia2dist.records import Example, TeacherRecord

datasets = pytest.importorskip("datasets")

WORDS = ("good bad film plot actor scene music long short dull bright slow fast funny sad "
         "great poor story ending start").split()


def _text(rng: random.Random, k: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(k))


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _index(uid: str) -> int:
    return int(uid.rsplit(":", 1)[1])


def _oracle(rows):
    """The rows as a Hugging Face dataset, each carrying its source index."""
    return datasets.Dataset.from_list([{**r, "_row": i} for i, r in enumerate(rows)])


# ----------------------------------------------------------------------------------------------
# Data: shuffle order and per-dataset steps (prepare_data.py)


def test_pool_and_eval_ids_follow_dataset_shuffle(tmp_path):
    """sst2-style: train_ds.shuffle(seed=42) first 2000 (here 60), val_ds.shuffle(seed=42) first
    500 (here 25). Different from a RandomState(42) permutation on these sizes."""
    rng = random.Random(0)
    train = [{"sentence": _text(rng), "label": rng.randint(0, 1)} for _ in range(150)]
    val = [{"sentence": _text(rng), "label": rng.randint(0, 1)} for _ in range(40)]
    cfg = DataConfig(task="sst2", train_path=_write(tmp_path / "t.jsonl", train),
                     eval_path=_write(tmp_path / "v.jsonl", val), max_train_pool=60, max_eval=25)
    data = load_task(cfg)
    expect_train = _oracle(train).shuffle(seed=42)["_row"][:60]
    expect_eval = _oracle(val).shuffle(seed=42)["_row"][:25]
    assert [_index(e.uid) for e in data.train_pool] == expect_train
    assert [_index(e.uid) for e in data.eval_items] == expect_eval
    assert expect_train != list(np.random.RandomState(42).permutation(150)[:60])
    for ex in data.train_pool:
        row = train[_index(ex.uid)]
        assert ex.query == f"Text:{row['sentence']}\nLabel:" and ex.answer == str(row["label"])


def test_finsen_shuffles_then_filters_then_splits_the_tail(tmp_path):
    rng = random.Random(1)
    rows = [{"sentence": _text(rng), "label": rng.randint(0, 2)} for _ in range(150)]
    cfg = DataConfig(task="finsen", train_path=_write(tmp_path / "f.jsonl", rows),
                     max_train_pool=60, max_eval=20)
    data = load_task(cfg)
    full = _oracle(rows).shuffle(seed=42).filter(lambda x: x["label"] in [0, 2])
    split_point = len(full) - 20
    assert [_index(e.uid) for e in data.train_pool] == full.select(range(split_point))["_row"][:60]
    assert [_index(e.uid) for e in data.eval_items] == \
        full.select(range(split_point, len(full)))["_row"]
    assert all(e.answer == {0: "0", 2: "1"}[rows[_index(e.uid)]["label"]]
               for e in data.train_pool + data.eval_items)


def test_strategytf_splits_the_tail_then_shuffles_each_part_again(tmp_path):
    rng = random.Random(2)
    rows = [{"question": _text(rng) + "?", "answer": rng.random() < 0.5} for _ in range(120)]
    cfg = DataConfig(task="strategytf", train_path=_write(tmp_path / "s.jsonl", rows),
                     max_train_pool=50, max_eval=20)
    data = load_task(cfg)
    full = _oracle(rows).shuffle(seed=42)
    split_point = len(full) - 20
    train_ds = full.select(range(split_point)).shuffle(seed=42)
    val_ds = full.select(range(split_point, len(full))).shuffle(seed=42)
    assert [_index(e.uid) for e in data.train_pool] == train_ds["_row"][:50]
    assert [_index(e.uid) for e in data.eval_items] == val_ds["_row"][:20]


def test_poems_filters_before_shuffling(tmp_path):
    rng = random.Random(3)
    rows = [{"id": i, "verse_text": _text(rng), "label": rng.randint(0, 3)} for i in range(100)]
    items = load_eval_items("poems", _write(tmp_path / "p.jsonl", rows), DataConfig(max_eval=30))
    expect = _oracle(rows).filter(lambda x: x["label"] in [0, 1]).shuffle(seed=42)["_row"][:30]
    assert [_index(e.uid) for e in items] == expect
    wrong_order = _oracle(rows).shuffle(seed=42).filter(lambda x: x["label"] in [0, 1])
    assert expect != wrong_order["_row"][:30], "the order of the two steps matters here"


def test_sciq_option_order_continues_the_global_stream(tmp_path):
    """np.random.seed(42); the remap draws; then np.random.shuffle([d1, d2, d3, None]) per
    formatted row: the first 2000 (here 25) shuffled training rows, then the validation rows."""
    rng = random.Random(4)

    def row():
        return {"question": _text(rng) + "?", "distractor1": _text(rng, 2),
                "distractor2": _text(rng, 2), "distractor3": _text(rng, 2),
                "correct_answer": _text(rng, 3), "support": ""}

    train, val = [row() for _ in range(40)], [row() for _ in range(15)]
    cfg = DataConfig(task="sciq_remap", train_path=_write(tmp_path / "t.jsonl", train),
                     eval_path=_write(tmp_path / "v.jsonl", val), max_train_pool=25, max_eval=10)
    data = load_task(cfg)

    stream = np.random.RandomState(42)
    remap, used = {}, set()
    for label in range(4):
        while True:
            token = stream.choice(list(REMAP_VOCABULARY))
            if token not in used:
                used.add(token)
                break
        remap[label] = str(token)
    expected = []
    for source, count in ((train, 25), (val, 10)):
        for i, index in enumerate(_oracle(source).shuffle(seed=42)["_row"]):
            if i == count:
                break
            r = source[index]
            options = [r["distractor1"], r["distractor2"], r["distractor3"], None]
            stream.shuffle(options)
            answer = options.index(None)
            options[answer] = r["correct_answer"]
            choices = "".join(f"[{remap[k]}]{opt}\n" for k, opt in enumerate(options))
            expected.append((f"Question:{r['question']}\nChoices:\n{choices}\nAnswer:",
                             remap[answer]))
    got = [(e.query, e.answer) for e in data.train_pool + data.eval_items]
    assert got == expected
    assert len({e.label_index for e in data.train_pool}) > 1


def test_remap_words_are_the_reference_draws():
    assert tuple(draw_remap_words(np.random.RandomState(42), 8)) == REMAP_WORDS
    assert TASKS["sciq_remap"].labels == REMAP_WORDS[:4]


@pytest.mark.parametrize("cut", ["reference", "word"])
def test_bbc_cut(tmp_path, cut):
    long_text = "x" * 251 + " word and more text after the limit " * 3
    rows = [{"text": long_text, "label": 2, "label_text": "sport"},
            {"text": "short entertainment news of a film premiere in london", "label": 3,
             "label_text": "entertainment"},
            {"text": "y" * 300, "label": 0, "label_text": "tech"}]
    items = load_eval_items("bbcnews", _write(tmp_path / "b.jsonl", rows),
                            DataConfig(bbc_cut=cut, max_eval=10))
    texts = {_index(e.uid): e.query[len("Text:"):-len("\nLabel:")] for e in items}
    for index, row in enumerate(rows):
        if cut == "reference":  # text[:256].split(" ")[:-1], always
            assert texts[index] == " ".join(row["text"][:256].split(" ")[:-1])
        else:
            assert texts[index] == (row["text"] if len(row["text"]) <= 256 else
                                    {0: "x" * 251 + " word", 2: "y" * 256}[index])
    assert texts[1] != rows[1]["text"] if cut == "reference" else texts[1] == rows[1]["text"]


# ----------------------------------------------------------------------------------------------
# Splits and demos (create_training_datasets.py, evaluate_batch_optimized.py)


def _reference_run(pool_size: int, n: int, run_idx: int, max_icl_demos: int = 256,
                   num_dev_examples: int = 48):
    all_indices = list(range(pool_size))
    rng = np.random.RandomState(run_idx)
    rng.shuffle(all_indices)
    train_indices = all_indices[:n]
    num_dev = min(num_dev_examples, n // 2)
    dev_indices = all_indices[n:n + num_dev]
    remaining = all_indices[n + num_dev:]
    max_demos = min(max_icl_demos, n - 1 if n > 1 else 0)
    icl = []
    for i in range(n):
        available = list(range(n))
        available.remove(i)
        if len(available) > max_demos:
            demo_indices = rng.choice(available, max_demos, replace=False)
        else:
            demo_indices = available
        demo_list = list(demo_indices)
        rng.shuffle(demo_list)
        icl.append([train_indices[k] for k in demo_list])
    return train_indices, dev_indices, remaining, icl, icl[:len(dev_indices)]


def _reference_eval_demos(remaining: list[int], num_items: int, run_idx: int, max_demos: int):
    rng = np.random.RandomState(run_idx)
    out = []
    for _ in range(num_items):
        available = list(range(len(remaining)))
        chosen = rng.choice(available, max_demos, replace=False)
        out.append([remaining[k] for k in chosen])
    return out


def _pool(k: int) -> list[Example]:
    return [Example(uid=str(i), query=f"Text:item {i}\nLabel:", answer=str(i % 2), label_index=i % 2)
            for i in range(k)]


def _ids(examples) -> list[int]:
    return [int(e.uid) for e in examples]


@pytest.mark.parametrize("n", [2, 4, 8, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_splits_and_demo_orders_equal_the_reference(n, seed):
    pool = _pool(120)
    train_idx, dev_idx, remaining, icl, dev_icl = _reference_run(120, n, seed)
    split = make_split(pool, n, seed)
    lists = train_demos(split, seed)
    assert (_ids(split.train), _ids(split.dev), _ids(split.pool)) == (train_idx, dev_idx, remaining)
    assert [_ids(lst) for lst in lists] == icl
    assert [_ids(lst) for lst in dev_demos(split, lists)] == dev_icl
    items = _pool(7)
    assert [_ids(lst) for lst in eval_demos(split.pool, items, n, seed)] == \
        _reference_eval_demos(remaining, 7, seed, min(256, n - 1))


def test_demo_cap_samples_then_shuffles():
    """N-1 above max_icl_demos: rng.choice of the cap, then the shuffle, same generator."""
    pool = _pool(60)
    train_idx, _, remaining, icl, _ = _reference_run(60, 8, 3, max_icl_demos=3)
    split = make_split(pool, 8, 3)
    assert [_ids(lst) for lst in train_demos(split, 3, max_demos=3)] == icl
    assert all(len(lst) == 3 for lst in icl)
    assert [_ids(lst) for lst in eval_demos(split.pool, _pool(4), 8, 3, max_demos=3)] == \
        _reference_eval_demos(remaining, 4, 3, 3)


# ----------------------------------------------------------------------------------------------
# Targets (data.py's ICLDataset, train_unified.py's label_type)


def _record(uid: str, response: list[int]) -> TeacherRecord:
    return TeacherRecord(uid, torch.tensor(response), torch.zeros(2, len(response), 4))


def test_tna_trains_on_the_icl_outputs_in_reference_mode(make_tokenizer):
    tok = make_tokenizer()
    methods = "train.methods=[sft,ia2,ia2_then_sft,ia2_plus_sft,sft_then_ia2,soft_sft]"
    reference = load_config(None, [methods]).train
    own = load_config(None, ["protocol=ia2dist", methods]).train
    assert label_type_for(reference, "ia2_plus_sft") == "icl"
    assert label_type_for(own, "ia2_plus_sft") == "ground_truth"
    for method in ("sft", "ia2_then_sft", "sft_then_ia2"):
        assert label_type_for(reference, method) == label_type_for(own, method) == "ground_truth"
    assert label_types_for(reference, "ia2") == label_types_for(reference, "soft_sft") == ()
    ex = Example("u", "Text:the movie was great\nLabel:", "1", 1)
    rec = _record("u", [7])
    kind = label_type_for(reference, "ia2_plus_sft")
    assert target_ids(tok, ex, rec, label_type=kind, max_new_tokens=1) == [7]
    gold = tok("1", add_special_tokens=False)["input_ids"]
    assert target_ids(tok, ex, rec, label_type="ground_truth", max_new_tokens=1) == gold


def test_ground_truth_targets_are_not_truncated(make_tokenizer):
    tok = make_tokenizer()
    answer = "12 + 30 = 42\n#### 42"
    ex = Example("q", "Question:What is 12 plus 30?\nAnswer:", answer)
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    assert len(ids) > 3
    full = target_ids(tok, ex, None, label_type="ground_truth", max_new_tokens=3)
    assert full == ids + [tok.eos_token_id]  # the whole answer and EOS, though T = 3
    assert target_ids(tok, ex, None, label_type="ground_truth", max_new_tokens=3,
                      truncate=True) == ids[:3]
    label = Example("m", "Text:x\nLabel:", "alpha beta")  # a multi-token label at T = 1
    tokens = tok("alpha beta", add_special_tokens=False)["input_ids"]
    assert len(tokens) > 1
    assert target_ids(tok, label, None, label_type="ground_truth", max_new_tokens=1) == tokens
    with pytest.raises(IA2Error, match="needs the teacher's response"):
        target_ids(tok, ex, None, label_type="icl", max_new_tokens=3)


# ----------------------------------------------------------------------------------------------
# Early stopping schedule (train_unified.py's training loop)


def _reference_eval_steps(n: int, batch_size: int, epochs: int, dev_eval_steps: int = 2):
    accumulation_steps = min(batch_size, n)
    global_step, steps = 0, []
    for _ in range(epochs):
        accumulated = 0
        for _ in range(n):
            accumulated += 1
            if accumulated % accumulation_steps == 0:
                global_step += 1
                if global_step % dev_eval_steps == 0 or accumulated == n:
                    steps.append(global_step)
    return steps


@pytest.mark.parametrize("n, epochs", [(2, 5), (4, 5), (12, 3)])
def test_dev_evaluation_steps_equal_the_reference(make_tokenizer, make_model, n, epochs):
    from ia2dist.config import AdapterConfig
    from ia2dist.model.adapters import apply_adapter
    from ia2dist.student.batching import StudentItem
    from ia2dist.student.trainer import train

    tok = make_tokenizer()
    model = apply_adapter(make_model("llama", tok), AdapterConfig(type="lora"), seed=0)
    label = tok("1", add_special_tokens=False)["input_ids"][-1:]
    items = [StudentItem(f"t{i}", tok(f"Text:item {i}\nLabel:")["input_ids"], label)
             for i in range(n + 1)]
    steps = {}
    for at_epoch_end in (True, False):
        cfg = TrainConfig(lr=1e-3, epochs=epochs, batch_size=4, micro_batch_size=4, patience=0,
                          eval_every=2, eval_at_epoch_end=at_epoch_end)
        result = train(model, items[:n], items[n:], "sft", cfg, seed=0)
        steps[at_epoch_end] = [row["step"] for row in result.history if "dev_loss" in row]
    assert steps[True] == _reference_eval_steps(n, 4, epochs)
    total = epochs * -(-n // 4)
    assert steps[False] == sorted({s for s in range(2, total + 1, 2)} | {total})


# ----------------------------------------------------------------------------------------------
# Parsers (utils.py)


@pytest.mark.parametrize("text, reference, own", [
    ("#### -3", "3", "-3"),
    ("So \\boxed{18} it is.\nWait, no: #### 20", "18", "20"),
    ("She saved 7 dollars and then the year was 2020", "7", "2020"),
    ("we had 12 apples in 2019", "12", "2019"),
    ("The answer is 1,050.50 dollars", "1050.5", "1050.5"),
    ("Answer: $5.00.", "5", "5"),
    ("Answer: 3 + 4 = 7", "3", "7"),
    ("The rate is 0.5 and 0.25", "The rate is 0.5 and 0.25", "0.25"),  # rates are skipped
    ("I don't know.", "I don't know.", ""),
    ("", "", ""),
])
def test_gsm8k_parsers_both_modes(text, reference, own):
    assert parsers.parse_gsm8k_reference(text) == reference
    assert parsers.parse_gsm8k(text) == own
    spec = TASKS["gsm8k"]
    assert spec.parser_for("reference")(text) == reference
    assert spec.parser_for("ia2dist")(text) == own


@pytest.mark.parametrize("text, reference, own", [
    ("$\\boxed{5}$. Also $y^{2}$", "5}$.Also$y^{2", "5"),
    ("\\boxed{3} then \\boxed{4}", "3}then\\boxed{4", "4"),
    ("so $f(7) = \\boxed{\\dfrac{1}{ 2}}$", "\\frac{1}{2}", "\\frac{1}{2}"),
    ("\\boxed{x - 3}\nand a stray }", "x-3", "x-3"),
    ("\\boxed{\\tfrac{3}{4}}", "\\tfrac{3}{4}", "\\frac{3}{4}"),
    ("We get \\boxed{\\frac{1}{", "\\frac{1", ""),  # a truncated answer still "parses"
    ("no box", "", ""),
])
def test_math_parsers_both_modes(text, reference, own):
    assert parsers.parse_math_reference(text) == reference
    assert parsers.parse_math(text) == own
    spec = TASKS["hmath_algebra"]
    assert spec.parser_for("reference")(text) == reference
    assert spec.parser_for("ia2dist")(text) == own


def test_reference_mode_scores_generations_with_reference_parsers():
    from ia2dist.eval.evaluate import score_generations

    examples = [Example(str(i), "Question:q\nAnswer:", "... #### 3") for i in range(3)]
    texts = ["#### -3", "\\boxed{3} and #### 5", "#### 3"]
    ref, _ = score_generations(texts, examples, TASKS["gsm8k"].parser_for("reference"))
    own, _ = score_generations(texts, examples, TASKS["gsm8k"].parser_for("ia2dist"))
    assert ref["accuracy"] == pytest.approx(1.0) and own["accuracy"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------
# The protocol switch


def test_protocol_sets_every_default_of_its_table():
    reference, own = load_config(None), load_config(None, ["protocol=ia2dist"])
    assert reference.protocol == "reference" and own.protocol == "ia2dist"

    def get(cfg, dotted):
        value = cfg
        for part in dotted.split("."):
            value = getattr(value, part)
        return value

    for dotted, (ref_value, own_value, why) in PROTOCOL_DEFAULTS.items():
        assert why
        # the default model (embedded) resolves dtype auto to float32
        expected = "float32" if ref_value == "auto" else ref_value
        assert get(reference, dotted) == expected, dotted
        assert get(own, dotted) == own_value, dotted
        assert get(RunConfig(), dotted) == expected, dotted


def test_options_stay_individually_overridable():
    cfg = load_config(None, ["protocol=ia2dist", "eval.parser=reference", "train.lr=3e-4",
                             "train.label_types.sft=[icl, ground_truth]"])
    assert cfg.eval.parser == "reference" and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.eval.label_ties == "argmax"
    merged = load_config(None, ["train.label_types.sft=[icl]"]).train.label_types
    assert merged == {"ia2_plus_sft": ["icl"], "sft": ["icl"]}
    hub = load_config(None, ["model.name_or_path=meta-llama/Llama-3.2-1B"])
    assert hub.model.dtype == "bfloat16"
    assert load_config(None, ["protocol=ia2dist", "model.name_or_path=meta-llama/Llama-3.2-1B"]) \
        .model.dtype == "float32"


def test_bad_protocol_and_label_types_are_reported():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["protocol=paper", "train.label_types.ia2=[icl]",
                           "train.label_types.sft=[]", "data.ood_tasks=[imdb]"])
    text = " ".join(info.value.problems)
    for part in ("protocol: 'paper'", "train.label_types.ia2", "train.label_types.sft",
                 "data.ood_tasks[0]"):
        assert part in text, part


def test_soft_labels_default_to_the_full_vocabulary():
    assert load_config(None, ["train.methods=[soft_sft]"]).extract.topk == -1
    assert load_config(None).extract.topk == 0
    assert load_config(None, ["train.methods=[soft_sft]", "extract.topk=20"]).extract.topk == 20
    from ia2dist.teacher.reference import top_k

    ids, logprobs = top_k(torch.randn(2, 11), -1)
    assert ids.shape == (2, 11)
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(2))


def test_docs_differences_table_names_every_protocol_option():
    from pathlib import Path

    page = (Path(__file__).parents[2] / "docs" / "paper.md").read_text()
    section = page.split("## Differences from the reference", 1)[1].split("\n## ", 1)[0]
    for dotted in PROTOCOL_DEFAULTS:
        assert f"`{dotted}`" in section, dotted
    for bug in ("no-op", "t2a", "tna with ground-truth", "N % batch", "uncertainty mode"):
        assert bug in section, bug


# ----------------------------------------------------------------------------------------------
# Out-of-distribution sets (evaluate_batch_optimized.py --eval_datasets / --icl_source_datasets)


def test_ood_sets_load_skip_and_fail_clearly(tmp_path, monkeypatch):
    rng = random.Random(5)
    fin = [{"sentence": _text(rng), "label": rng.randint(0, 2)} for _ in range(80)]
    poems = [{"id": i, "verse_text": _text(rng), "label": rng.randint(0, 3)} for i in range(40)]
    fin_path, poems_path = _write(tmp_path / "f.jsonl", fin), _write(tmp_path / "p.jsonl", poems)
    cfg = DataConfig(task="sst2", train_path=fin_path, max_eval=10,
                     ood_paths={"finsen": fin_path, "poems": poems_path})
    sets = load_ood_sets(cfg)
    assert [(s.name, s.icl_source) for s in sets] == [("finsen", "sst2"), ("poems", "sst2")]
    full = _oracle(fin).shuffle(seed=42).filter(lambda x: x["label"] in [0, 2])
    assert [_index(e.uid) for e in sets[0].items] == full.select(range(len(full) - 10,
                                                                       len(full)))["_row"]
    assert [_index(e.uid) for e in sets[1].items] == \
        _oracle(poems).filter(lambda x: x["label"] in [0, 1]).shuffle(seed=42)["_row"][:10]
    # local training data and no path for poems: skipped (offline); an explicit list must load
    partial = DataConfig(task="sst2", train_path=fin_path, ood_paths={"finsen": fin_path},
                         max_eval=10)
    assert [s.name for s in load_ood_sets(partial)] == ["finsen"]
    import datasets as hf

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(hf, "load_dataset", offline)
    explicit = DataConfig(task="sst2", train_path=fin_path, ood_tasks=["poems"], max_eval=10)
    with pytest.raises(IA2Error, match=r"poem_sentiment.*data.ood_paths.poems"):
        load_ood_sets(explicit)
    assert load_ood_sets(DataConfig(task="synthetic")) == []
    assert load_ood_sets(DataConfig(task="sst2", ood_tasks=[])) == []
