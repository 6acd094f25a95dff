"""The memory planner and the multi-device teacher map, from model configs alone (no weights).

Figures for real model sizes come from their published configs (Llama 3 8B / 70B shapes); the
planner's counts are checked against real tiny models and real PEFT adapters."""

import math

import pytest
import torch
from transformers import LlamaConfig

from ia2dist.config import load_config
from ia2dist.errors import IA2Error
from ia2dist.experiment.memory_plan import (GiB, ModelSize, _trainable_params, check_fits,
                                            plan_memory)

DEMO = "configs/demo.yaml"
# a Ray run on GPUs: bf16, one GPU per teacher replica, micro-batches of 1
GPU_RUN = ["model.dtype=bfloat16", "train.batch_size=8", "data.num_train=[16]", "dist.backend=ray", "dist.use_gpu=true", "dist.teacher_gpus=1",
           "train.micro_batch_size=1", "extract.batch_size=8", "eval.batch_size=8"]


def llama(hidden, layers, heads, kv_heads, ffn, vocab=128256):
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=vocab,
                       tie_word_embeddings=False)


LLAMA3_8B = llama(4096, 32, 32, 8, 14336)
LLAMA3_70B = llama(8192, 80, 64, 8, 28672)


@pytest.fixture(scope="module")
def sizes():
    return {"8b": ModelSize.of(LLAMA3_8B), "70b": ModelSize.of(LLAMA3_70B)}


def plan_for(config, size, *overrides):
    cfg = load_config(DEMO, [*GPU_RUN, *overrides])
    return cfg, plan_memory(cfg, config, max_new_tokens=1, teacher_prompt_tokens=1024,
                            student_tokens=128, size=size, examples_per_unit=64)


def test_parameter_counts_of_published_shapes(sizes):
    assert sizes["8b"].num_params == 8_030_261_248  # Llama 3 8B
    assert sizes["70b"].num_params == 70_553_706_496  # Llama 3 70B
    assert sizes["8b"].kv_dim == 8 * 128 and sizes["8b"].embedding_params == 128256 * 4096


def test_counts_match_real_tiny_models_and_peft_adapters(make_tokenizer, make_model):
    from ia2dist.config import AdapterConfig
    from ia2dist.model.adapters import apply_adapter

    tok = make_tokenizer()
    for arch, kw in (("llama", {}), ("llama", {"kv_heads": 2}), ("qwen2", {})):
        model = make_model(arch, tok, **kw)
        size = ModelSize.of(model.config)
        assert size.num_params == sum(p.numel() for p in model.parameters())  # tied counted once
        assert size.largest_layer_params == max(sum(p.numel() for p in layer.parameters())
                                                for layer in model.model.layers)
        for targets in (["q_proj", "k_proj", "o_proj"], ["q_proj", "v_proj"]):
            adapter = AdapterConfig(type="lora", r=4, targets=targets)
            student = apply_adapter(make_model(arch, tok, **kw), adapter)
            trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
            assert _trainable_params(size, adapter) == trainable, (arch, kw, targets)


def test_student_rank_holds_its_share_of_the_base(sizes):
    weights = sizes["8b"].num_params * 2
    for k in (1, 2, 4):
        _, plan = plan_for(LLAMA3_8B, sizes["8b"], f"dist.group_size={k}", f"dist.num_workers={k}")
        student = plan.role("student rank")
        assert student.parts["frozen base"] == math.ceil(weights / k)
        assert student.device == "gpu" and student.count == k
        assert plan.role("driver").per_process < 0.1 * GiB  # no weights in the driver
    # ZeRO-3 offload: the partitions live in host memory
    _, plan = plan_for(LLAMA3_8B, sizes["8b"], "dist.ds_config=zero3_offload")
    student = plan.role("student rank")
    assert student.parts["frozen base"] == 0 and student.host >= weights
    # ZeRO-2: every rank holds the whole base
    _, plan = plan_for(LLAMA3_8B, sizes["8b"], "dist.ds_config=zero2", "dist.group_size=2",
                       "dist.num_workers=2")
    assert plan.role("student rank").parts["frozen base"] == weights


def test_engine_follows_the_layout_and_the_memory_plan(sizes):
    """dist.ds_config=auto: the plain engine on one rank (the model whole, nothing gathered),
    ZeRO-3 on several, zero3_offload on one rank when the plain engine does not fit the GPU; a
    named template is used as asked, on one rank too."""
    from ia2dist.student.engines.choice import choose_engine

    weights = sizes["8b"].num_params * 2
    cfg, plan = plan_for(LLAMA3_8B, sizes["8b"])
    student = plan.role("student rank")
    choice = choose_engine(cfg.dist, student_bytes=student.per_process, gpu_bytes=80 * GiB)
    assert (choice.engine, choice.template) == ("torch", None)
    assert "nothing to partition" in choice.describe()
    assert student.parts["frozen base"] == weights and not student.parts["gathered layers"]
    cfg, _ = plan_for(LLAMA3_8B, sizes["8b"], "dist.group_size=2", "dist.num_workers=2")
    assert (choose_engine(cfg.dist).engine, choose_engine(cfg.dist).template) == \
        ("deepspeed", "zero3")
    cfg, plan = plan_for(LLAMA3_8B, sizes["8b"], "dist.ds_config=zero3")
    choice = choose_engine(cfg.dist, student_bytes=0, gpu_bytes=80 * GiB)
    assert choice.template == "zero3" and "dist.ds_config=zero3 asks for it" in choice.reason
    assert plan.role("student rank").parts["gathered layers"] > 0
    assert choose_engine(load_config(DEMO, ["dist.backend=local"]).dist).engine == "torch"
    # 70B LoRA on one 80 GiB GPU: the plain engine does not fit, ZeRO-3 offload is chosen
    cfg, plan = plan_for(LLAMA3_70B, sizes["70b"], "dist.teacher_gpus=2")
    choice = choose_engine(cfg.dist, student_bytes=plan.role("student rank").per_process,
                           gpu_bytes=80 * GiB)
    assert choice.template == "zero3_offload" and "does not fit" not in choice.reason
    assert "GiB but a GPU has 80.0 GiB" in choice.reason
    offloaded = plan_memory(cfg, LLAMA3_70B, max_new_tokens=1, teacher_prompt_tokens=1024,
                            student_tokens=128, size=sizes["70b"], examples_per_unit=64,
                            ds_config=choice.template)
    assert offloaded.role("student rank").parts["frozen base"] == 0
    assert offloaded.role("student rank").host >= sizes["70b"].num_params * 2


def test_teacher_replica_over_several_gpus(sizes):
    weights = sizes["8b"].num_params * 2
    _, one = plan_for(LLAMA3_8B, sizes["8b"])
    _, two = plan_for(LLAMA3_8B, sizes["8b"], "dist.teacher_gpus=2")
    assert one.role("teacher replica").parts["weights"] == weights
    # half the weights per GPU, plus room for one whole layer (layers are not split)
    assert two.role("teacher replica").parts["weights"] == \
        math.ceil(weights / 2) + sizes["8b"].largest_layer_params * 2


def test_refusals_name_the_role_and_the_fix(sizes):
    cfg, plan = plan_for(LLAMA3_70B, sizes["70b"])
    with pytest.raises(IA2Error, match=r"^plan: a teacher replica needs 1[0-9.]+ GiB per GPU .*"
                                       r"dist\.teacher_gpus=2"):
        check_fits(plan, cfg, gpu_bytes=80 * GiB, node_bytes=None)
    cfg, plan = plan_for(LLAMA3_70B, sizes["70b"], "dist.teacher_gpus=2")
    with pytest.raises(IA2Error, match=r"^plan: a student rank needs .*dist\.group_size=2.*"
                                       r"zero3_offload"):
        check_fits(plan, cfg, gpu_bytes=80 * GiB, node_bytes=None)
    cfg, plan = plan_for(LLAMA3_70B, sizes["70b"], "dist.teacher_gpus=2", "dist.group_size=4",
                         "dist.num_workers=4")
    check_fits(plan, cfg, gpu_bytes=80 * GiB, node_bytes=None)
    # 8B LoRA fits one 24 GiB GPU per role; full fine-tuning needs ZeRO-3 over 8 of them
    cfg, plan = plan_for(LLAMA3_8B, sizes["8b"])
    check_fits(plan, cfg, gpu_bytes=24 * GiB, node_bytes=None)
    for k, fits in ((4, False), (8, True)):
        cfg, plan = plan_for(LLAMA3_8B, sizes["8b"], "train.adapter.type=full",
                             f"dist.group_size={k}", f"dist.num_workers={k}")
        if fits:
            check_fits(plan, cfg, gpu_bytes=24 * GiB, node_bytes=None)
        else:
            with pytest.raises(IA2Error, match="student rank.*dist.group_size=8"):
                check_fits(plan, cfg, gpu_bytes=24 * GiB, node_bytes=None)
    # host memory: every local process counts against this machine
    cfg, plan = plan_for(LLAMA3_8B, sizes["8b"], "dist.ds_config=zero3_offload")
    with pytest.raises(IA2Error, match="^plan: the run needs .* of host memory"):
        check_fits(plan, cfg, gpu_bytes=80 * GiB, node_bytes=8 * GiB)


def test_device_map_places_whole_layers_in_order_within_budgets(make_tokenizer, make_model):
    from ia2dist.model.placement import plan_device_map

    tok = make_tokenizer()
    model = make_model("llama", tok, layers=4)
    config = model.config
    total = sum(p.numel() * 4 for p in model.parameters())
    device_map = plan_device_map(config, "float32", [total, total], devices=["cpu:a", "cpu:b"])
    names = list(device_map)
    assert names[:1] == ["model.embed_tokens"] and "lm_head" in names
    assert [n for n in names if n.startswith("model.layers.")] == \
        [f"model.layers.{i}" for i in range(4)]
    # in forward order, the first device then the second; tied LM head with its embeddings
    order = [device_map[n] for n in names if n != "lm_head"]
    assert order == sorted(order) and set(order) == {"cpu:a", "cpu:b"}
    if config.tie_word_embeddings:
        assert device_map["lm_head"] == device_map["model.embed_tokens"]
    per_device = {d: 0 for d in ("cpu:a", "cpu:b")}
    modules = dict(model.named_modules())
    for name, dev in device_map.items():
        if not (name == "lm_head" and config.tie_word_embeddings):
            per_device[dev] += sum(p.numel() * 4 for p in modules[name].parameters())
    assert max(per_device.values()) <= 0.75 * total  # balanced, not all on one device
    with pytest.raises(IA2Error, match="^dist.teacher_gpus: the model's weights"):
        plan_device_map(config, "float32", [total // 4, total // 4], devices=["cpu:a", "cpu:b"])


def test_device_mapped_model_computes_the_same(tmp_path, make_tokenizer, make_model):
    """A model loaded with a device map (accelerate's dispatch hooks) gives the plain model's
    logits and captured attention outputs (CPU only here: both "devices" are the CPU)."""
    from ia2dist.config import ModelConfig
    from ia2dist.model.load import load_model
    from ia2dist.model.placement import plan_device_map
    from ia2dist.model.structure import attention_sites
    from ia2dist.teacher.capture import ActivationCapture

    tok = make_tokenizer()
    model = make_model("llama", tok, layers=4)
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tok.save_pretrained(tmp_path / "m")
    cfg = ModelConfig(name_or_path=str(tmp_path / "m"), dtype="float32", device="cpu")
    device_map = plan_device_map(model.config, "float32", [10 * GiB] * 2, devices=["cpu", "cpu"])
    mapped = load_model(cfg, device_map=device_map)
    plain = load_model(cfg)
    ids = torch.tensor([tok("alpha beta gamma delta")["input_ids"]])
    outs = []
    for m in (plain, mapped):
        with ActivationCapture(attention_sites(m)) as cap, torch.no_grad():
            cap.select(torch.zeros(ids.shape[1], dtype=torch.long), torch.arange(ids.shape[1]))
            logits = m(input_ids=ids).logits
            outs.append((logits, cap.stacked()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_plan_verb_prints_every_role_and_refuses_what_does_not_fit(capsys):
    from ia2dist.cli import main

    tiny = ["model.name_or_path=tiny:llama", "dist.backend=ray"]
    assert main(["plan", DEMO, *tiny]) == 0
    out = capsys.readouterr().out
    for role in ("teacher replica", "student rank", "driver"):
        assert f"| {role} |" in out
    assert out.strip().endswith("fits")
    assert "student engine: plain PyTorch engine: a group of one rank" in out
    assert main(["plan", DEMO, *tiny, "dist.use_gpu=true", "dist.gpu_memory_gb=0.001"]) == 1
    out = capsys.readouterr().out
    assert "does not fit: plan: a " in out and "| student rank |" in out
    assert "student engine: DeepSpeed zero3_offload: the memory plan gives a student rank" in out
