"""Config loading: YAML + overrides, every problem reported at once, hashing."""

import pytest

from ia2dist.config import RunConfig, config_hash, expand_grid, is_sweep, load_config
from ia2dist.errors import ConfigError


def test_defaults_are_valid():
    cfg = load_config(None)
    assert isinstance(cfg, RunConfig)
    assert cfg.train.adapter.type == "lora" and cfg.train.adapter.r == 8 and cfg.train.adapter.alpha == 8
    assert cfg.train.adapter.targets == ["q_proj", "k_proj", "o_proj"]
    assert cfg.eval.ece_bins == 15 and cfg.data.max_dev == 48


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  task: sst2\n  num_train: [2, 4]\ntrain:\n  lr: 3.0e-4\n  adapter:\n    r: 16\n")
    cfg = load_config(path, ["train.lr=1e-4", "data.seeds=[0,1,2]", "train.adapter.targets=q_proj",
                             "eval.similarity=false"])
    assert cfg.data.task == "sst2" and cfg.data.num_train == [2, 4]
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.data.seeds == [0, 1, 2]
    assert cfg.train.adapter.r == 16 and cfg.train.adapter.targets == ["q_proj"]
    assert cfg.eval.similarity is False


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lr=-1", "data.task=nope", "train.methods=[sft,bogus]",
                           "train.batch_size=3", "bogus.key=1", "train.epochs=many"])
    problems = info.value.problems
    fields = " ".join(problems)
    for name in ("train.lr", "data.task", "train.methods[1]", "train.batch_size", "bogus",
                 "train.epochs"):
        assert name in fields, name
    assert len(problems) == 6
    assert "\n" not in str(info.value)


def test_unknown_field_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1e-3\n")
    with pytest.raises(ConfigError, match=r"train.learning_rate: unknown field"):
        load_config(path)


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: 1e-3\n   epochs: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(path)


def test_missing_config_and_data_paths(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"data.train_path: file .* does not exist"):
        load_config(None, [f"data.train_path={tmp_path}/nope.jsonl"])


def test_hash_is_stable_and_sensitive():
    a, b = load_config(None), load_config(None)
    assert config_hash(a) == config_hash(b)
    assert config_hash(load_config(None, ["train.lr=0.5"])) != config_hash(a)


def test_sweep_grid_expands_per_method():
    cfg = load_config(None, ["train.lr=[1e-4, 3e-4]", "train.plus_sft_weight=[0.01, 0.5]",
                             "train.label_types.sft=[ground_truth, icl]"])
    assert cfg.train.lr == [1e-4, 3e-4]
    grid = {m: expand_grid(cfg.train, m) for m in ("sft", "ia2", "ia2_plus_sft", "ia2_then_sft")}
    assert [p.tag for p in grid["ia2"]] == ["lr0.0001", "lr0.0003"]
    assert [p.tag for p in grid["sft"]] == ["lr0.0001_gt", "lr0.0001_icl", "lr0.0003_gt",
                                            "lr0.0003_icl"]
    assert [p.tag for p in grid["ia2_plus_sft"]] == ["lr0.0001_w0.01_icl", "lr0.0001_w0.5_icl",
                                                     "lr0.0003_w0.01_icl", "lr0.0003_w0.5_icl"]
    point = grid["ia2_plus_sft"][1]
    assert point.params == {"lr": 1e-4, "plus_sft_weight": 0.5, "label_type": "icl"}
    assert (point.train.lr, point.train.plus_sft_weight, point.train.label_type) == (1e-4, 0.5,
                                                                                     "icl")
    assert point.train.label_types == {} and cfg.train.lr == [1e-4, 3e-4]  # a copy
    assert all(isinstance(p.train.lr, float) for pts in grid.values() for p in pts)
    assert is_sweep(cfg.train) and not is_sweep(load_config(None).train)
    single = expand_grid(load_config(None).train, "ia2_plus_sft")
    assert [p.tag for p in single] == ["lr0.0001_w0.02_icl"]


def test_sweep_values_are_checked():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lr=[1e-4, -1]", "train.plus_sft_weight=[]"])
    text = " ".join(info.value.problems)
    assert "train.lr: -1.0 must be > 0" in text and "train.plus_sft_weight: empty list" in text


def test_real_config_is_the_reference_protocol_uncapped():
    """configs/real.yaml (make demo-real, the paper's claim) keeps the reference's schedule: up to
    50 epochs with patience 5, no step cap, dev evaluation every 2 steps and at each epoch end, the
    lr grid {1e-4, 3e-4, 1e-3} with a selection rule, >= 5 seeds, >= 200 test items; and the cells
    of the Makefile's REAL_CELLS name both model families."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(str(repo / "configs" / "real.yaml"))
    assert cfg.protocol == "reference"
    assert (cfg.train.epochs, cfg.train.patience, cfg.train.max_steps) == (50, 5, None)
    assert cfg.train.eval_every == 2 and cfg.train.eval_at_epoch_end
    assert sorted(cfg.train.lr) == [1e-4, 3e-4, 1e-3] and cfg.eval.selection in ("test", "dev")
    assert len(cfg.data.seeds) >= 5 and cfg.data.max_eval >= 200
    assert {"sft", "ia2", "ia2_then_sft"} <= set(cfg.train.methods)
    cells = re.search(r"^REAL_CELLS \?=((?:.*\\\n)*.*)$", (repo / "Makefile").read_text(), re.M)
    models = {cell.split(":")[0] for cell in cells.group(1).replace("\\\n", " ").split()}
    assert models == {"smollm2", "gemma3-270m"}
