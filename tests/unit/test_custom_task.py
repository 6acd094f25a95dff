"""data.task=custom: a task defined by your own files (JSONL / JSON / CSV / TSV / Parquet
rows with an input and an output) and a template in the config; classification with a label
set, generation without; the chat-template option; every bad row and setting gives one line
naming where and how to fix it."""

import csv
import json
from pathlib import Path

import pytest

from ia2dist.cli import main
from ia2dist.config import CustomTaskConfig, DataConfig, ModelConfig, load_config
from ia2dist.data.loaders import load_task, read_rows
from ia2dist.errors import ConfigError, DataError, IA2Error

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"input": f"item {i} is {'good' if i % 2 else 'bad'}",
             "output": "yes" if i % 2 else "no", "topic": f"t{i % 3}"}
            for i in range(start, start + n)]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _csv(path: Path, rows: list[dict], delimiter: str = ",") -> str:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _cfg(train: str, eval_path: str | None = None, **custom) -> DataConfig:
    return DataConfig(task="custom", train_path=train, eval_path=eval_path, max_eval=4,
                      custom=CustomTaskConfig(**custom))


# ----------------------------------------------------------------------------------------------
# Loading


def test_classification_task_from_jsonl_uses_the_label_set_and_the_papers_template(tmp_path):
    data = load_task(_cfg(_jsonl(tmp_path / "t.jsonl", _rows(20)), labels=["no", "yes"]))
    assert data.spec.kind == "classification" and data.spec.single_token
    assert data.labels == ("no", "yes")
    assert (len(data.train_pool), len(data.eval_items)) == (16, 4)  # the shuffled tail evaluates
    ex = data.train_pool[0]
    number = int(ex.uid.rsplit(":", 1)[1])
    assert ex.uid.startswith("custom:train:")
    assert ex.query == f"Text:item {number} is {'good' if number % 2 else 'bad'}\nLabel:"
    assert ex.answer == ("yes" if number % 2 else "no") and ex.label_index == number % 2
    assert {e.uid for e in data.train_pool}.isdisjoint(e.uid for e in data.eval_items)


def test_generation_task_with_template_fields_answer_prefix_and_eval_file(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", _rows(12))
    evals = _jsonl(tmp_path / "eval.jsonl", _rows(6, start=100))
    data = load_task(_cfg(train, evals, template="[{topic}] Q: {input}\nA:", answer_prefix=" ",
                          max_new_tokens=5, parser="first_line"))
    spec = data.spec
    assert spec.kind == "qa" and data.labels is None and spec.max_new_tokens == 5
    assert len(data.train_pool) == 12 and len(data.eval_items) == 4
    ex = data.eval_items[0]
    number = int(ex.uid.rsplit(":", 1)[1]) + 100
    assert ex.uid.startswith("custom:eval:")
    assert ex.query == f"[t{number % 3}] Q: item {number} is {'good' if number % 2 else 'bad'}\nA:"
    assert ex.answer == (" yes" if number % 2 else " no") and ex.label_index is None
    assert ex.meta["gold"] == ex.answer.strip() and spec.parse(" YES\nmore") == "yes"


def test_csv_tsv_parquet_and_json_files_give_the_same_examples(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(15)
    paths = {"jsonl": _jsonl(tmp_path / "r.jsonl", rows), "csv": _csv(tmp_path / "r.csv", rows),
             "tsv": _csv(tmp_path / "r.tsv", rows, "\t")}
    (tmp_path / "r.json").write_text(json.dumps({"data": rows}))
    paths["json"] = str(tmp_path / "r.json")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    paths["parquet"] = str(tmp_path / "r.parquet")
    loaded = {kind: load_task(_cfg(path, labels=["no", "yes"])) for kind, path in paths.items()}
    first = loaded["jsonl"]
    for kind, data in loaded.items():
        assert data.train_pool == first.train_pool and data.eval_items == first.eval_items, kind
    # CSV values are strings, a quoted comma or newline stays inside its value
    quoted = tmp_path / "q.csv"
    quoted.write_text('input,output\n"a, b",yes\n"two\nlines",no\n')
    assert read_rows(quoted) == [{"input": "a, b", "output": "yes"},
                                 {"input": "two\nlines", "output": "no"}]
    excel = tmp_path / "excel.csv"  # a byte-order mark before the header is not part of a name
    excel.write_text("input,output\nx,yes\n", encoding="utf-8-sig")
    assert read_rows(excel) == [{"input": "x", "output": "yes"}]


def test_integer_outputs_match_string_labels(tmp_path):
    rows = [{"text": f"x{i}", "label": i % 2} for i in range(10)]
    data = load_task(_cfg(_jsonl(tmp_path / "t.jsonl", rows), input_field="text",
                          output_field="label", labels=["0", "1"], answer_prefix=" "))
    assert data.labels == (" 0", " 1")
    assert all(ex.answer == f" {ex.label_index}" for ex in data.train_pool)


# ----------------------------------------------------------------------------------------------
# Bad rows and settings: one line, file:line, the field, the fix


@pytest.mark.parametrize("row, custom, needles", [
    ({"text": "a", "output": "yes"}, {}, ["field 'input' is missing (fields present: output, text)",
                                         "data.custom.input_field"]),
    ({"input": "a", "output": "maybe"}, {"labels": ["no", "yes"]},
     ["field 'output' is 'maybe', not one of data.custom.labels ('no', 'yes')",
      "add the label to data.custom.labels"]),
    ({"input": "  ", "output": "yes"}, {}, ["field 'input' is empty", "fill it in or remove"]),
    ({"input": {"a": 1}, "output": "yes"}, {}, ["field 'input' should be text, got dict",
                                                "store it as a string"]),
    ({"input": "a", "output": "none"}, {"parser": "gsm8k"},
     ["field 'output' has no answer that data.custom.parser=gsm8k finds",
      "another data.custom.parser"]),
    ({"input": "a", "output": "yes"}, {"template": "{src}: {input}"},
     ["field 'src' is missing (data.custom.template uses {src}", "change data.custom.template"]),
])
def test_bad_row_names_file_line_field_and_fix(tmp_path, row, custom, needles):
    path = _jsonl(tmp_path / "t.jsonl", [*_rows(3), row, *_rows(3)])
    with pytest.raises(DataError) as info:
        load_task(_cfg(path, **custom))
    message = str(info.value)
    assert message.startswith(f"{path}:4: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("text, needles", [
    (b"input,output\na,yes\nb,no,extra\n", [":3: 3 values but the header has 2 columns",
                                           "quote values that contain ','"]),
    (b"input,output\na,yes\nb\n", [":3: fewer values than the header's 2 columns"]),
    (b"input,output\n", ["no rows"]),
    (b"input,output\ncaf\xe9,yes\n", ["not UTF-8 text (byte 16); save the file as UTF-8"]),
])
def test_bad_csv_lines(tmp_path, text, needles):
    path = tmp_path / "t.csv"
    path.write_bytes(text)
    with pytest.raises(DataError) as info:
        load_task(_cfg(str(path)))
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_bad_parquet_row_is_located_by_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(4)
    rows[2]["output"] = "perhaps"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet row 2: field 'output' is 'perhaps'"):
        load_task(_cfg(str(tmp_path / "t.parquet"), labels=["no", "yes"]))


@pytest.mark.parametrize("overrides, needle", [
    (["data.task=custom"], "data.train_path: data.task=custom reads your rows from a local file"),
    (["data.task=sst2", "data.custom.labels=[a,b]"], "data.custom: set, but data.task is 'sst2'"),
    (["data.custom.labels=[good]"], "data.custom.labels: ['good'] has fewer than 2 labels"),
    (["data.custom.labels=[good, ' good']"], "repeats a label"),
    (["data.custom.labels=[yes, no]"], "data.custom.labels[0]: got the boolean True (YAML reads "
                                       "yes/no/on/off/true/false unquoted as booleans); quote it"),
    (["data.custom.template=Text"], "data.custom.template: 'Text' has no {input}"),
    (["data.custom.template={input} -> {output}"], "uses {output}, the answer"),
    (["data.custom.template={input"], "data.custom.template: "),
    (["data.custom.parser=regex"], "data.custom.parser: 'regex' is not allowed"),
    (["data.custom.max_new_tokens=0"], "data.custom.max_new_tokens: must be between 1 and 4096"),
])
def test_bad_custom_settings_are_config_errors(tmp_path, overrides, needle):
    train = _jsonl(tmp_path / "t.jsonl", _rows(8))
    base = [] if overrides[0].startswith("data.task=") else ["data.task=custom",
                                                             f"data.train_path={train}"]
    with pytest.raises(ConfigError) as info:
        load_config(None, [*base, *overrides])
    assert needle in str(info.value), str(info.value)


def test_cli_bad_row_fails_in_one_line_and_writes_nothing(tmp_path, capsys):
    train = _jsonl(tmp_path / "t.jsonl", [*_rows(5), {"input": "x", "answer": "yes"}])
    rc = main(["run", f"run_dir={tmp_path / 'run'}", "model.name_or_path=tiny:llama",
               "data.task=custom", f"data.train_path={train}", "wandb.mode=disabled"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert err.startswith(f"error: {train}:6: field 'output' is missing"), err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# Chat template


def _chat_tokenizer(tmp_path: Path) -> str:
    from ia2dist.model.load import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path="tiny:llama"))
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok")


def _chat_plan(tmp_path: Path):
    """(a plan of a custom task with data.custom.chat_template, its config and tokenizer)."""
    from ia2dist.model.load import load_tokenizer
    from ia2dist.experiment.plan import Plan, chat_wrap_for

    tokenizer = load_tokenizer(ModelConfig(name_or_path="tiny:llama",
                                           tokenizer=_chat_tokenizer(tmp_path)))
    train = _jsonl(tmp_path / "t.jsonl", _rows(20))
    cfg = load_config(None, ["data.task=custom", f"data.train_path={train}", "data.max_eval=4",
                             "data.num_train=[4]", "data.custom.labels=['no', 'yes']",
                             "data.custom.chat_template=true",
                             f"model.tokenizer={tmp_path / 'tok'}", "model.name_or_path=tiny:llama",
                             f"run_dir={tmp_path / 'run'}"])
    task = load_task(cfg.data)
    return Plan(cfg, task, chat=chat_wrap_for(cfg, task, tokenizer)), cfg, tokenizer


def test_chat_template_wraps_each_prompt_in_one_user_turn(tmp_path):
    from ia2dist.data.custom import chat_wrap
    from ia2dist.model.decode import encode
    from ia2dist.model.load import load_tokenizer
    from ia2dist.experiment.plan import Plan, chat_wrap_for

    plan, cfg, tokenizer = _chat_plan(tmp_path)
    # the tokenizer adds BOS itself, so the template's BOS text is left out (not doubled)
    assert chat_wrap(tokenizer, "tok") == ("<|user|>", "<|end|><|assistant|>")
    assert plan.chat == ("<|user|>", "<|end|><|assistant|>")
    unit = plan.units[0]
    prompts, _ = plan.teacher_inputs(unit)
    demos = "\n\n".join(d.demo() for d in unit.train_demo_lists[0])
    assert prompts[plan.read_order(unit).index(("train", 0))] == \
        f"<|user|>{demos}\n\n{unit.train[0].query}<|end|><|assistant|>"
    student = plan.eval_prompts(unit, with_demos=False)
    assert student[0] == f"<|user|>{plan.eval_items[0].query}<|end|><|assistant|>"
    assert encode(tokenizer, student[:1])[0].count(tokenizer.bos_token_id) == 1
    task = load_task(cfg.data)
    plain = load_tokenizer(ModelConfig(name_or_path="tiny:llama"))
    with pytest.raises(DataError, match="no chat template; set data.custom.chat_template=false"):
        chat_wrap_for(cfg, task, plain)
    with pytest.raises(IA2Error, match="^data.custom.chat_template: building the prompts needs "
                                       "the tokenizer; pass Plan chat="):
        Plan(cfg, task)  # no chat wrap: the prompts cannot be built


def test_a_plan_travels_with_its_chat_wrap_and_without_a_tokenizer(tmp_path):
    """Ray ships the plan to the teacher actors and worker groups, which keep their own tokenizer:
    the plan holds none, and its chat wrap (hence every prompt) survives the round trip."""
    cloudpickle = pytest.importorskip("ray.cloudpickle")  # what Ray serialises it with

    plan, _, _ = _chat_plan(tmp_path)
    assert "tokenizer" not in vars(plan)
    data = cloudpickle.dumps(plan)
    assert b"transformers" not in data  # no tokenizer (nor any other transformers object)
    copy_ = cloudpickle.loads(data)
    assert copy_.chat == plan.chat == ("<|user|>", "<|end|><|assistant|>")
    unit, copied = plan.units[0], copy_.units[0]
    assert copy_.teacher_inputs(copied) == plan.teacher_inputs(unit)
    assert copy_.eval_prompts(copied, with_demos=True) == plan.eval_prompts(unit, with_demos=True)
    assert copy_.eval_prompts(copied, with_demos=False) == plan.eval_prompts(unit, with_demos=False)


# ----------------------------------------------------------------------------------------------
# Runs end to end (one process, tiny model)


SMALL = ["model.name_or_path=tiny:llama", "data.num_train=[4]", "data.seeds=[0]", "data.max_eval=8",
         "train.epochs=2", "eval.similarity_items=4", "wandb.mode=disabled", "dist.backend=local"]
