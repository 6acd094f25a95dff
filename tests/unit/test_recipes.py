"""`ia2dist plan` from a model's config.json alone (no tokenizer files, no dataset download) on
every recipe in configs/recipes/, with bare config.json files written from the published shapes.
"""

import json
from pathlib import Path

import pytest

from ia2dist.cli import main

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "configs" / "recipes"

#: The published config.json shapes of the recipes' models (the fields the plan reads).
SHAPES = {
    "llama3-8b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                  "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "max_position_embeddings": 8192, "rope_theta": 500000.0,
                  "tie_word_embeddings": False},
    "llama3-70b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0,
                   "tie_word_embeddings": False},
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                   "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_position_embeddings": 131072, "rope_theta": 1000000.0,
                   "tie_word_embeddings": False},
}


def _model_dir(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SHAPES[name]))
    return folder


def _plan(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.parametrize("recipe, model, gpus, params", [
    ("llama3_8b_lora_1node_4gpu", "llama3-8b", 4, "8.030B"),
    ("llama3_8b_lora_2node_slurm", "llama3-8b", 8, "8.030B"),
    ("llama3_70b_lora_teacher_2gpu", "llama3-70b", 8, "70.554B"),
    ("qwen2_5_7b_lora_gsm8k", "qwen2.5-7b", 2, "7.616B"),
])
def test_every_recipe_plans_from_a_bare_config_json(tmp_path, capsys, recipe, model, gpus, params):
    rc, out = _plan(capsys, str(RECIPES / f"{recipe}.yaml"),
                    f"model.name_or_path={_model_dir(tmp_path, model)}")
    assert rc == 0, out
    assert f"model: {params} parameters" in out
    assert f"\nGPUs needed: {gpus} (" in out
    assert "note: prompt lengths estimated from the" in out and out.rstrip().endswith("fits")
    assert "teacher replicas run on CPU" not in out


def test_every_recipe_is_tested():
    tested = {"llama3_8b_lora_1node_4gpu", "llama3_8b_lora_2node_slurm",
              "llama3_70b_lora_teacher_2gpu", "qwen2_5_7b_lora_gsm8k"}
    assert {p.stem for p in RECIPES.glob("*.yaml")} == tested


def test_plan_refuses_what_does_not_fit_and_flags_a_cpu_teacher(tmp_path, capsys):
    recipe = str(RECIPES / "llama3_8b_lora_1node_4gpu.yaml")
    model = f"model.name_or_path={_model_dir(tmp_path, 'llama3-8b')}"
    rc, out = _plan(capsys, recipe, model, "dist.gpu_memory_gb=16")
    assert rc == 1 and "does not fit: plan: a " in out and "needs" in out, out
    # a cluster (dist.ray_address): this machine's host memory is not what the teacher gets
    rc, out = _plan(capsys, recipe, model, "dist.teacher_gpus=0", "dist.num_workers=4",
                    "dist.ray_address=auto")
    assert rc == 0, out
    assert "GPUs needed: 4 (students 4 rank(s) x 1 GPU in groups of 1)" in out
    assert "note: the teacher replicas run on CPU (dist.teacher_gpus=0); set dist.teacher_gpus=1" \
        in out


def test_plan_with_local_rows_and_no_tokenizer_counts_characters(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"input": "word " * 40, "output": "yes" if i % 2 else "no"})
                            + "\n" for i in range(40)))
    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text(json.dumps(
        {**SHAPES["llama3-8b"], "hidden_size": 256, "intermediate_size": 512,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 1024}))
    rc, out = _plan(capsys, f"model.name_or_path={small}", "data.task=custom",
                    f"data.train_path={rows}", "data.max_eval=8",
                    "data.custom.labels=['yes', 'no']", "data.num_train=[8]")
    assert rc == 0, out
    assert f"note: no tokenizer (model.name_or_path: could not load '{small}')" in out
    assert "prompt lengths counted at 3.5 characters per token" in out
    assert "GPUs needed: 1 (dist.backend=local" in out
    # a chat-templated task: its markup needs the tokenizer, the plan counts without it
    rc, chat = _plan(capsys, f"model.name_or_path={small}", "data.task=custom",
                     f"data.train_path={rows}", "data.max_eval=8",
                     "data.custom.labels=['yes', 'no']", "data.num_train=[8]",
                     "data.custom.chat_template=true")
    assert rc == 0, chat
    assert "characters per token (chat template markup not counted)" in chat
    assert "GPUs needed: 1 (dist.backend=local" in chat


def test_plan_on_the_cpu_demo_uses_the_real_tokenizer(capsys):
    rc, out = _plan(capsys, str(REPO / "configs" / "demo.yaml"), "data.num_train=[4]",
                    "data.seeds=[0]")
    assert rc == 0, out
    assert "note:" not in out  # exact lengths: the data is generated and the tokenizer is there
    assert "GPUs needed: 0 (teacher 1 replica" not in out and "GPUs needed: 0" in out
