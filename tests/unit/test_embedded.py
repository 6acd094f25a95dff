"""Synthetic few-shot family and the embedded (locally pretrained) default model."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from ia2dist.data.synthetic import DEMO_SEPARATOR, SyntheticFamily
from ia2dist.model.embedded import (
    FAMILY_NAME,
    REPORT_NAME,
    PretrainRecipe,
    build_family_tokenizer,
    get_embedded_model_dir,
    load_family,
    pretrain,
)
from ia2dist.errors import ConfigError

ITEM_RE = re.compile(r"Text:([a-z]+)\nLabel:([a-z]+)")
#: Small enough for a unit test, same code path as the real recipe.
TINY_RECIPE = PretrainRecipe(batch_size=8, examples_per_sequence=8, steps=200, num_threads=1,
                             eval_tasks=2, eval_queries=8, eval_shots=(0, 4))


@pytest.fixture(scope="module")
def family():
    return SyntheticFamily()


@pytest.fixture(scope="module")
def tokenizer(family):
    return build_family_tokenizer(family)


def _mapping(examples):
    return tuple(sorted({(ex.meta["cluster"], ex.answer) for ex in examples}))


def test_family_is_deterministic_and_seed_dependent():
    a, b, c = SyntheticFamily(seed=5), SyntheticFamily(seed=5), SyntheticFamily(seed=6)
    assert a.clusters == b.clusters and a.label_words == b.label_words
    assert a.clusters != c.clusters
    assert [a.heldout_task(i) for i in range(4)] == [b.heldout_task(i) for i in range(4)]
    task_a, task_b = a.heldout_task(3), b.heldout_task(3)
    assert task_a.examples(20, seed=1, split="train") == task_b.examples(20, seed=1, split="train")
    assert task_a.examples(20, seed=1, split="train") != task_a.examples(20, seed=2, split="train")
    text_a = a.pretrain_text(np.random.default_rng(0), 6)
    assert text_a == b.pretrain_text(np.random.default_rng(0), 6)


def test_train_and_eval_splits_use_disjoint_words(family):
    task = family.heldout_task(0)
    train = {ex.meta["word"] for ex in task.examples(200, seed=0, split="train")}
    evals = {ex.meta["word"] for ex in task.examples(200, seed=0, split="eval")}
    assert train and evals and not train & evals
    members = {w for c in task.clusters for w in family.clusters[c]}
    assert train | evals <= members


def test_heldout_mappings_never_appear_in_pretraining(family):
    heldout = [family.heldout_task(i) for i in range(64)]
    heldout_keys = {tuple(sorted(zip(t.clusters, t.labels))) for t in heldout}
    assert len(heldout_keys) == 64  # distinct mappings
    assert all(family.is_heldout(t.clusters, t.labels) for t in heldout)
    assert all(_mapping(t.examples(64, 0, "train")) in heldout_keys for t in heldout)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        mapping = _mapping(family.pretrain_examples(rng, 16))
        assert mapping not in heldout_keys
        assert len(mapping) < family.labels_per_task or not family.is_heldout(*zip(*mapping))


def test_every_word_and_label_is_one_token_in_context(family, tokenizer):
    for word in family.vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    examples = family.pretrain_examples(np.random.default_rng(1), 5)
    text = DEMO_SEPARATOR.join(ex.demo() for ex in examples)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)
    for ex in examples:
        assert ex.meta["word"] in tokens and ex.answer in tokens
    # BOS, then per item: "Text:" word "\nLabel:" label "\n\n" (no separator after the last)
    assert tokens[:6] == ["<s>", "Text:", examples[0].meta["word"], "\nLabel:",
                          examples[0].answer, "\n\n"]
    assert len(tokens) == 1 + 5 * 5 - 1


def test_example_format(family):
    task = family.heldout_task(2)
    assert len(task.labels) == family.labels_per_task
    for ex in task.examples(30, seed=0, split="eval"):
        assert ex.query == f"Text:{ex.meta['word']}\nLabel:"
        assert ex.answer == task.labels[ex.label_index]
        assert ex.meta["task"] == task.task_id and ex.meta["cluster"] in task.clusters
        assert ex.meta["word"] in family.clusters[ex.meta["cluster"]]
    text = family.pretrain_text(np.random.default_rng(3), 7)
    items = text.split(DEMO_SEPARATOR)
    assert len(items) == 7 and all(ITEM_RE.fullmatch(item) for item in items)
    words = [ITEM_RE.fullmatch(item).group(1) for item in items]
    assert len(set(words)) == 7  # drawn without replacement


def test_label_noise_replaces_labels_with_other_labels():
    noisy = SyntheticFamily(label_noise=0.3)
    task = noisy.heldout_task(0)
    examples = task.examples(2000, seed=0, split="train")
    flipped = [ex for ex in examples if ex.meta["noisy"]]
    assert 0.25 < len(flipped) / len(examples) < 0.35
    assert all(ex.label_index != task.label_of(ex.meta["cluster"]) for ex in flipped)
    with pytest.raises(ConfigError, match="labels_per_task"):
        SyntheticFamily(labels_per_task=9)


def test_short_pretraining_gives_a_loadable_model_dir(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = pretrain(tmp_path, recipe=TINY_RECIPE, progress=False)
    assert report["steps"] == 200 and report["steps_per_s"] > 0
    assert set(report["heldout_icl"]) == {"0", "4"}
    assert report["history"][-1]["label_loss"] < 3.0  # left ln(vocab) ~ 6.2 behind
    assert json.loads((tmp_path / REPORT_NAME).read_text())["steps"] == 200
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    family = load_family(tmp_path)
    ex = family.heldout_task(0).examples(1, 0, "eval")[0]
    logits = model(**tok(ex.query, return_tensors="pt")).logits
    assert logits.shape == (1, 4, len(tok))  # BOS "Text:" word "\nLabel:"
    assert type(model).__name__ == "LlamaForCausalLM"


def test_pretraining_is_seeded(tmp_path):
    recipe = dataclasses.replace(TINY_RECIPE, eval_tasks=1, eval_queries=4, eval_shots=(0,))
    pretrain(tmp_path / "a", steps=5, seed=3, recipe=recipe, progress=False)
    pretrain(tmp_path / "b", steps=5, seed=3, recipe=recipe, progress=False)
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_failed_pretraining_leaves_no_complete_looking_dir(tmp_path, monkeypatch):
    import ia2dist.model.embedded as embedded

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(embedded, "_train", crash)
    with pytest.raises(RuntimeError, match="killed"):
        get_embedded_model_dir(tmp_path, progress=False, recipe=TINY_RECIPE)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_cache_is_reused_and_keyed_by_recipe(tmp_path, monkeypatch):
    import ia2dist.model.embedded as embedded

    recipe = dataclasses.replace(TINY_RECIPE, steps=20, eval_tasks=1, eval_queries=4)
    first = get_embedded_model_dir(tmp_path, progress=False, recipe=recipe)
    assert (first / REPORT_NAME).is_file() and (first / FAMILY_NAME).is_file()
    assert (first / "config.json").is_file() and (first / "tokenizer.json").is_file()

    def must_not_train(*args, **kwargs):
        raise AssertionError("pretrained again instead of using the cache")

    monkeypatch.setattr(embedded, "pretrain", must_not_train)
    assert get_embedded_model_dir(tmp_path, progress=False, recipe=recipe) == first
    monkeypatch.setenv("IA2DIST_CACHE", str(tmp_path))
    assert get_embedded_model_dir(progress=False, recipe=recipe) == first
    other = dataclasses.replace(recipe, lr=1e-3)
    assert other.cache_key(0) != recipe.cache_key(0) != recipe.cache_key(1)
    with pytest.raises(AssertionError, match="pretrained again"):
        get_embedded_model_dir(tmp_path, progress=False, recipe=other)


def test_time_budget_stops_training_early(tmp_path):
    recipe = dataclasses.replace(TINY_RECIPE, eval_tasks=1, eval_queries=4, eval_shots=(0,))
    report = pretrain(tmp_path, budget_s=0.5, recipe=recipe, progress=False)
    assert 0 < report["steps"] < recipe.steps and report["train_s"] < 5
    assert (tmp_path / REPORT_NAME).is_file()


def test_default_model_ships_with_the_package(tmp_path, monkeypatch):
    """The default recipe's model is packaged: found without pretraining, nothing written to the
    cache, and it is what the recipe describes (same recipe in its report) and learns in context."""
    import ia2dist.model.embedded as embedded
    from ia2dist.config import ModelConfig
    from ia2dist.model.load import load_model, load_tokenizer

    def must_not_train(*args, **kwargs):
        raise AssertionError("pretrained instead of using the packaged model")

    monkeypatch.setattr(embedded, "pretrain", must_not_train)
    monkeypatch.setenv("IA2DIST_CACHE", str(tmp_path))
    found = get_embedded_model_dir(progress=False)
    assert found.parent == embedded.PACKAGED_DIR and not any(tmp_path.iterdir())
    assert embedded.cached_embedded_model_dir() == found
    report = json.loads((found / REPORT_NAME).read_text())
    recipe = PretrainRecipe()
    assert json.loads(json.dumps(dataclasses.asdict(recipe))) == report["recipe"]
    assert found.name == f"embedded-{recipe.cache_key(0)}" and report["steps"] == recipe.steps
    icl = report["heldout_icl"]
    assert icl["8"]["accuracy"] > 0.8 and icl["0"]["accuracy"] < 0.4  # chance is 0.25
    # and it loads as the model of `model.name_or_path: embedded`
    cfg = ModelConfig(name_or_path="embedded", dtype="float32", device="cpu")
    model, tok = load_model(cfg), load_tokenizer(cfg)
    assert sum(p.numel() for p in model.parameters()) == report["num_parameters"]
    assert tok.convert_tokens_to_ids("\nLabel:") != tok.unk_token_id
