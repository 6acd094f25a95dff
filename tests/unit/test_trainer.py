"""Student batching and the training loop on a tiny Llama with LoRA (CPU, a few seconds)."""

import copy
import math

import pytest
import torch

from ia2dist.config import TrainConfig
from ia2dist.errors import IA2Error
from ia2dist.losses import ce_loss, ia2_loss
from ia2dist.model.structure import attention_sites
from ia2dist.records import TeacherRecord
from ia2dist.student.batching import StudentItem, collate
from ia2dist.student.engines.torch_engine import TorchEngine
from ia2dist.student.trainer import METHOD_PHASES, TrainOptions, train
from ia2dist.teacher.capture import ActivationCapture

CLASSIFICATION = [("the movie was great", "1"), ("a dull and boring plot", "0"),
                  ("great great film", "1"), ("boring and dull", "0"), ("the plot was great", "1"),
                  ("a dull movie", "0")]
QA = [("What is 12 plus 30?", "42"), ("What is 3 plus 4?", "7"), ("What is 2 plus 2?", "4")]


# ------------------------------------------------------------------------------------------ fixtures

def _greedy_record(model, tokenizer, uid, teacher_prompt, num_tokens, topk=5):
    """Teacher record by the definition: greedy tokens, then one teacher-forced forward capturing
    the positions that predict them (last prompt token and y_1..y_{T-1})."""
    ids = tokenizer(teacher_prompt)["input_ids"]
    response = []
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = model(input_ids=torch.tensor([ids + response])).logits
            response.append(int(logits[0, -1].argmax()))
        seq = torch.tensor([ids + response[:-1]])
        pos = torch.arange(len(ids) - 1, len(ids) - 1 + num_tokens)
        with ActivationCapture(attention_sites(model)) as cap:
            cap.select(torch.zeros_like(pos), pos)
            logits = model(input_ids=seq).logits[0, pos]
            acts = cap.stacked()
    logprobs, top_ids = torch.log_softmax(logits, -1).topk(topk, -1)
    return TeacherRecord(uid, torch.tensor(response), acts.to(torch.bfloat16), top_ids, logprobs)


@pytest.fixture(scope="module")
def setup(make_tokenizer, make_model):
    """Tokenizer, frozen tiny Llama teacher, and student items (classification T=1, QA T=3)."""
    tok = make_tokenizer(add_bos=True)
    base = make_model("llama", tok, seed=0)
    for p in base.parameters():
        p.requires_grad_(False)

    def make_items(pairs, template, num_tokens, prefix):
        queries = [template.format(x) for x, _ in pairs]
        items = []
        for i, (query, (_, answer)) in enumerate(zip(queries, pairs)):
            demos = [q + a for j, (q, (_, a)) in enumerate(zip(queries, pairs)) if j != i]
            rec = _greedy_record(base, tok, f"{prefix}{i}", "\n\n".join(demos) + "\n\n" + query,
                                 num_tokens)
            target = tok(answer, add_special_tokens=False)["input_ids"]
            if num_tokens > 1:
                target = target + [tok.eos_token_id]
            items.append(StudentItem(f"{prefix}{i}", tok(query)["input_ids"], target, rec))
        return items

    cls_items = make_items(CLASSIFICATION, "Text:{}\nLabel:", 1, "cls")
    qa_items = make_items(QA, "Question:{}\nAnswer:", 3, "qa")
    return {"tok": tok, "base": base, "cls": cls_items, "qa": qa_items}


def lora_student(base, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "o_proj"],
                     task_type="CAUSAL_LM")
    return get_peft_model(copy.deepcopy(base), cfg)


def cfg(**kw):
    base = dict(lr=1e-2, epochs=50, batch_size=4, micro_batch_size=2, patience=0, eval_every=2,
                max_steps=8)
    base.update(kw)
    return TrainConfig(**base)


class RecordingEngine(TorchEngine):
    """TorchEngine that remembers, per step, the gradients, the Adam step counters and the weights."""

    instances: list = []

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.grads, self.adam_steps, self.states = [], [], []
        RecordingEngine.instances.append(self)

    def step(self):
        self.grads.append({n: p.grad.detach().clone() for n, p in self.params.items()
                           if p.grad is not None})
        super().step()
        self.adam_steps.append({int(s["step"]) for s in self.optimizer.state.values()})
        self.states.append(self.trainable_state())


def recording_factory(model, train_cfg):
    return RecordingEngine.from_config(model, train_cfg)


def student_acts(model, items):
    batch = collate(items, 0, "right", need=("ia2",))
    with torch.no_grad(), ActivationCapture(attention_sites(model)) as cap:
        cap.select(batch.teacher.b_idx_K, batch.teacher.pos_idx_K)
        model(**batch.model_inputs())
        return cap.stacked(), batch.teacher_acts_LKD


# ------------------------------------------------------------------------------------------ batching

def test_collate_positions_single_and_two_rows(setup):
    tok = setup["tok"]
    cls, qa = setup["cls"][0], setup["qa"][0]
    batch = collate([cls, qa], pad_id=0, padding_side="right", need=("ce", "ia2"))
    # cls: T=1 -> one row (prompt only) for both terms; qa: ground truth != teacher -> two rows
    assert batch.input_ids_BS.shape[0] == 3
    p_cls, p_qa = len(cls.prompt_ids), len(qa.prompt_ids)
    assert batch.ce.b_idx_K.tolist() == [0, 1, 1, 1]
    assert batch.ce.pos_idx_K.tolist() == [p_cls - 1] + list(range(p_qa - 1, p_qa + 2))
    assert batch.targets_K.tolist() == cls.target_ids + qa.target_ids
    assert batch.teacher.b_idx_K.tolist() == [0, 2, 2, 2]
    assert batch.teacher.pos_idx_K.tolist() == [p_cls - 1] + list(range(p_qa - 1, p_qa + 2))
    assert batch.input_ids_BS[1, :p_qa + 2].tolist() == qa.prompt_ids + qa.target_ids[:2]
    teacher_resp = qa.teacher.response_ids.tolist()
    assert batch.input_ids_BS[2, :p_qa + 2].tolist() == qa.prompt_ids + teacher_resp[:2]
    assert batch.teacher_acts_LKD.dtype == torch.float32
    assert batch.teacher_acts_LKD.shape == (2, 4, 64)
    assert tok.bos_token_id == batch.input_ids_BS[0, 0]

    # teacher responses as CE targets: one row per item
    icl = StudentItem(qa.uid, qa.prompt_ids, teacher_resp, qa.teacher)
    assert collate([icl], 0, "left", need=("ce", "ia2")).input_ids_BS.shape[0] == 1


def test_collate_left_padding_and_virtual_tokens(setup):
    items = setup["cls"][:2] + setup["qa"][:1]
    right = collate(items, 0, "right", need=("ce",))
    left = collate(items, 0, "left", need=("ce",))
    width = right.input_ids_BS.shape[1]
    for b in range(right.input_ids_BS.shape[0]):
        n = int(right.attention_mask_BS[b].sum())
        assert left.input_ids_BS[b, width - n:].tolist() == right.input_ids_BS[b, :n].tolist()
        assert left.position_ids_BS[b, width - n:].tolist() == list(range(n))
    # every selected position is a real token, at the same token in both layouts
    for batch in (left, right):
        assert batch.attention_mask_BS[batch.ce.b_idx_K, batch.ce.pos_idx_K].all()
    assert torch.equal(left.input_ids_BS[left.ce.b_idx_K, left.ce.pos_idx_K],
                       right.input_ids_BS[right.ce.b_idx_K, right.ce.pos_idx_K])
    shifted = collate(items, 0, "right", num_virtual_tokens=5, need=("ce",))
    assert torch.equal(shifted.ce.pos_idx_K, right.ce.pos_idx_K + 5)
    assert "position_ids" not in shifted.model_inputs()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # RoPE hides position shifts; GPT-2 does not
def test_padding_side_gives_identical_losses(setup, make_model, arch):
    model = setup["base"] if arch == "llama" else make_model(arch, setup["tok"])
    items = setup["cls"][:3] + setup["qa"]
    values = []
    for side in ("left", "right"):
        batch = collate(items, 0, side, need=("ce", "ia2"))
        with torch.no_grad(), ActivationCapture(attention_sites(model)) as cap:
            cap.select(batch.teacher.b_idx_K, batch.teacher.pos_idx_K)
            logits = model(**batch.model_inputs()).logits
            acts = cap.stacked()
        ce = ce_loss(logits[batch.ce.b_idx_K, batch.ce.pos_idx_K], batch.targets_K)
        ia2 = ia2_loss(acts, batch.teacher_acts_LKD)
        values.append((float(ce[0]), ce[1], float(ia2[0]), ia2[1]))
    assert values[0] == pytest.approx(values[1], rel=1e-5)


def test_teacher_forced_student_acts_match_teacher_when_prompts_equal(setup):
    """Positions sanity: with the teacher's own prompt (no demos) and response, the student forward
    at the collated positions reproduces the captured teacher activations exactly."""
    tok, model = setup["tok"], setup["base"]
    query = "Question:What is 3 plus 4?\nAnswer:"
    rec = _greedy_record(model, tok, "q", query, 3)
    item = StudentItem("q", tok(query)["input_ids"], [5], rec)
    acts, teacher = student_acts(model, [item])
    assert torch.allclose(acts, teacher, atol=2e-2)  # bf16 storage


# ------------------------------------------------------------------------------------------ training

@pytest.mark.parametrize("method", list(METHOD_PHASES))
def test_every_method_reduces_its_training_loss(setup, method):
    model = lora_student(setup["base"])
    items = setup["cls"][:2] + setup["qa"][:2]
    result = train(model, items, [], method, cfg(max_steps=12), seed=0)
    assert [p["objective"] for p in result.phases] == list(METHOD_PHASES[method])
    for index, phase in enumerate(result.phases):
        losses = [h["loss"] for h in result.history if h["phase"] == index]
        assert len(losses) == phase["steps"] == 12
        # full-batch steps: each loss is the whole training objective at that step's weights
        assert losses[-1] < 0.9 * losses[0], (method, index, losses)


def test_ia2_moves_student_activations_toward_teacher(setup):
    items = setup["cls"][:2] + setup["qa"][:2]
    model = lora_student(setup["base"])
    before, teacher = student_acts(model, items)
    train(model, items, [], "ia2", cfg(max_steps=15), seed=0)
    after, _ = student_acts(model, items)
    err_before = (before - teacher).pow(2).mean(dim=(1, 2))
    err_after = (after - teacher).pow(2).mean(dim=(1, 2))
    assert (err_after < 0.5 * err_before).all(), (err_before, err_after)
    cos = torch.nn.functional.cosine_similarity
    assert cos(after, teacher, dim=-1).mean() > cos(before, teacher, dim=-1).mean()


def test_ia2_then_sft_continues_adapter_with_fresh_optimiser(setup):
    RecordingEngine.instances.clear()
    model = lora_student(setup["base"])
    items = setup["qa"] + setup["cls"][:1]
    result = train(model, items, setup["cls"][1:3], "ia2_then_sft", cfg(max_steps=4),
                   seed=0, options=TrainOptions(engine_factory=recording_factory))
    first, second = RecordingEngine.instances
    assert [p["objective"] for p in result.phases] == ["ia2", "ce"]
    assert first.optimizer is not second.optimizer
    assert first.adam_steps[-1] == {4}
    assert second.adam_steps[0] == {1}  # Adam state started anew
    # the same adapter parameters continue, from phase 1's restored best state
    assert all(a is b for a, b in zip(first.params.values(), second.params.values()))
    best = first.states[result.phases[0]["best_step"] - 1]
    update = {n: second.states[0][n] - best[n] for n in best}
    assert any(u.abs().max() > 0 for u in update.values())
    assert all(u.abs().max() <= 1.1 * 1e-2 for u in update.values())  # one Adam step of lr from best


@pytest.mark.parametrize("method", ["ia2_plus_sft", "soft_sft"])
def test_micro_batches_match_full_batch(setup, method):
    """Gradient accumulation over micro-batches of 1 equals one micro-batch of 4 (global counts)."""
    items = setup["qa"] + setup["cls"][:1]   # unequal positions per item
    runs = []
    for micro, side in ((4, "right"), (1, "right"), (4, "left")):
        RecordingEngine.instances.clear()
        model = lora_student(setup["base"])
        result = train(model, items, [], method, cfg(micro_batch_size=micro, max_steps=2), seed=0,
                       options=TrainOptions(engine_factory=recording_factory, padding_side=side))
        runs.append((result.history, RecordingEngine.instances[0].grads))
    (hist_ref, grads_ref) = runs[0]
    for hist, grads in runs[1:]:
        assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in hist_ref], rel=1e-5)
        for step_ref, step in zip(grads_ref, grads):
            for name, g in step_ref.items():
                torch.testing.assert_close(step[name], g, rtol=1e-4, atol=1e-7)


def test_same_seed_same_losses(setup):
    items = setup["cls"] + setup["qa"]
    runs = []
    for seed in (3, 3, 4):
        model = lora_student(setup["base"])
        result = train(model, items, [], "sft", cfg(batch_size=2, micro_batch_size=1, max_steps=6),
                       seed=seed)
        runs.append([h["loss"] for h in result.history])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # another seed shuffles differently


def test_early_stopping_restores_best_state(setup):
    """Dev targets contradict the training targets, so the dev loss gets worse as training goes on;
    the phase must stop early and really put the best evaluated weights back."""
    RecordingEngine.instances.clear()
    train_items = setup["cls"][:4]
    dev_items = [StudentItem(f"dev{i}", it.prompt_ids, [18 if it.target_ids == [19] else 19],
                             it.teacher) for i, it in enumerate(train_items)]
    model = lora_student(setup["base"])
    logged = []
    result = train(model, train_items, dev_items, "sft",
                   cfg(batch_size=2, micro_batch_size=2, patience=2, eval_every=1, max_steps=40),
                   seed=0,
                   options=TrainOptions(engine_factory=recording_factory, log=logged.append))
    phase = result.phases[0]
    engine = RecordingEngine.instances[0]
    dev_losses = {h["step"]: h["dev_loss"] for h in result.history if "dev_loss" in h}
    assert phase["stopped_early"] and phase["steps"] < 40
    assert phase["best_step"] == min(dev_losses, key=dev_losses.get)
    assert phase["best_dev"] == dev_losses[phase["best_step"]]
    assert phase["steps"] == phase["best_step"] + 2
    assert logged == result.history
    current = {n: p.detach() for n, p in engine.params.items()}
    best, last = engine.states[phase["best_step"] - 1], engine.states[-1]
    assert all(torch.equal(current[n], best[n]) for n in current)
    assert any(not torch.equal(current[n], last[n]) for n in current)


def test_soft_sft_needs_topk(setup):
    item = setup["cls"][0]
    rec = TeacherRecord(item.uid, item.teacher.response_ids, item.teacher.acts_LTD)
    bare = StudentItem(item.uid, item.prompt_ids, item.target_ids, rec)
    with pytest.raises(IA2Error, match="extract.topk"):
        train(lora_student(setup["base"]), [bare], [], "soft_sft", cfg(), seed=0)
    no_teacher = StudentItem(item.uid, item.prompt_ids, item.target_ids, None)
    with pytest.raises(IA2Error, match="teacher"):
        train(lora_student(setup["base"]), [no_teacher], [], "ia2", cfg(), seed=0)


def test_prompt_tuning_shifts_positions_to_real_tokens(setup):
    """Prompt tuning prepends virtual tokens to the output: IA2 positions must skip them and land on
    the same real tokens as without virtual tokens."""
    from peft import PromptTuningConfig, get_peft_model

    from ia2dist.model.adapters import num_virtual_tokens

    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(setup["base"]),
                           PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    assert num_virtual_tokens(model) == 4
    items = setup["cls"][:2] + setup["qa"][:1]
    plain = collate(items, 0, "right", need=("ia2",))
    shifted = collate(items, 0, "right", num_virtual_tokens=4, need=("ia2",))
    sites = attention_sites(model)
    with torch.no_grad(), ActivationCapture(sites) as cap:
        cap.select(None)
        model(**shifted.model_inputs())
        full_LBSD = cap.stacked()
        cap.select(shifted.teacher.b_idx_K, shifted.teacher.pos_idx_K)
        model(**shifted.model_inputs())
        selected = cap.stacked()
    assert full_LBSD.shape[2] == plain.input_ids_BS.shape[1] + 4
    real_LBSD = full_LBSD[:, :, 4:]  # the outputs of the real tokens
    assert torch.equal(selected, real_LBSD[:, plain.teacher.b_idx_K, plain.teacher.pos_idx_K])
    # the trainer applies the shift: its first full-batch loss is IA2 at the real tokens
    total, count = ia2_loss(selected, shifted.teacher_acts_LKD)
    unshifted, _ = ia2_loss(full_LBSD[:, plain.teacher.b_idx_K, plain.teacher.pos_idx_K],
                            plain.teacher_acts_LKD)
    assert not torch.isclose(total, unshifted)
    result = train(model, items, [], "ia2", cfg(max_steps=6, lr=5e-2), seed=0)
    losses = [h["loss"] for h in result.history]
    assert losses[0] == pytest.approx(float(total) / count, rel=1e-5)
    assert losses[-1] < losses[0]


class _AccessLog(list):
    """A list of items that records the order in which the loop first reads each index."""

    def __init__(self, items):
        super().__init__(items)
        self.first_reads = []

    def __getitem__(self, index):
        if isinstance(index, int) and index not in self.first_reads:
            self.first_reads.append(index)
        return super().__getitem__(index)


def test_first_epoch_order_is_the_loops_read_order(setup):
    """The distributed teacher stage extracts in ``first_epoch_order``; if the loop read items in
    another order, pipelined training would wait on shards extracted last."""
    from ia2dist.experiment.order import first_epoch_order

    items = _AccessLog(setup["cls"] + setup["cls"])
    train(lora_student(setup["base"]), items, [], "sft", cfg(max_steps=3, batch_size=2,
          micro_batch_size=2, epochs=1), seed=11, options=TrainOptions(validate_items=False))
    assert items.first_reads == first_epoch_order(len(items), 11)[:len(items.first_reads)]
    assert len(items.first_reads) == 6


@pytest.mark.parametrize("student,objective", [
    ("lora", "ce"), ("lora", "kl"), ("lora", "ia2+ce"), ("prompt", "ce"), ("prompt", "ia2+ce"),
    ("gpt2", "ce"), ("gpt2", "kl")])  # (teacher activations come from the Llama base)
def test_lm_head_on_selected_positions_gives_full_logits_losses(setup, make_model, student,
                                                                objective):
    """CE/KL forwards send only the positions they read through the LM head (logits_to_keep with
    the distinct positions): losses and gradients equal those from full [B, S, V] logits."""
    from peft import PromptTuningConfig, get_peft_model

    from ia2dist.config import AdapterConfig
    from ia2dist.model.adapters import apply_adapter, num_virtual_tokens
    from ia2dist.model.decode import logits_to_keep_kwargs
    from ia2dist.model.fastpaths import last_position_mlp
    from ia2dist.model.structure import unwrap_peft
    from ia2dist.student.trainer import OBJECTIVE_TERMS, _Context, _term_pairs

    torch.manual_seed(0)
    if student == "lora":
        model = lora_student(setup["base"])
    elif student == "prompt":
        model = get_peft_model(copy.deepcopy(setup["base"]),
                               PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    else:
        gpt2 = make_model("gpt2", setup["tok"])
        for p in gpt2.parameters():
            p.requires_grad_(False)
        model = apply_adapter(gpt2, AdapterConfig(), seed=0)
    items = setup["cls"][:3] + setup["qa"]
    terms = OBJECTIVE_TERMS[objective]
    shift = num_virtual_tokens(model)
    engine = TorchEngine(model)
    results = []
    for keep_kwargs in (logits_to_keep_kwargs(unwrap_peft(model)), {}):
        assert keep_kwargs or results  # the fast path (first) is exercised
        ctx = _Context(sites=attention_sites(model), device=torch.device("cpu"), pad_id=0,
                       padding_side="right", num_virtual_tokens=shift, cfg=cfg(),
                       logits_kwargs=keep_kwargs, last_mlp=last_position_mlp(model), seed=0)
        batch = collate(items, 0, "right", shift, need=terms)
        engine.zero_grad()
        pairs = _term_pairs(engine, batch, terms, ctx)
        loss = sum(total for total, _ in pairs.values())
        loss.backward()
        results.append(({t: (float(v[0]), v[1]) for t, v in pairs.items()},
                        {n: p.grad.clone() for n, p in engine.params.items()}))
    (fast, fast_grads), (full, full_grads) = results
    assert fast.keys() == full.keys() == set(terms)
    for term in terms:
        assert fast[term][1] == full[term][1]
        assert fast[term][0] == pytest.approx(full[term][0], rel=1e-5)
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], rtol=1e-4, atol=1e-7)


def test_a_rank_with_no_dev_item_runs_fillers_on_an_item_of_its_own():
    """N=2 on a group of 2 ranks: one dev item, read by rank 0 only. Rank 1's zero-weighted filler
    forwards must use one of its own training items: a rank never reads another rank's records
    (they are not sent to it)."""
    from types import SimpleNamespace

    from ia2dist.experiment.order import home_ranks
    from ia2dist.student.trainer import _own_item, _Share

    class OwnOnly(list):
        def __init__(self, items, own):
            super().__init__(items)
            self.own = own

        def __getitem__(self, i):
            assert i in self.own, f"read item {i} of another rank"
            return list.__getitem__(self, i)

    engine = SimpleNamespace(rank=1, world_size=2)
    homes = home_ranks(2, seed=0, world_size=2)
    train = OwnOnly(["t0", "t1"], own={i for i, h in enumerate(homes) if h == 1})
    dev = OwnOnly(["d0"], own=set())
    spare = _own_item(train, homes, engine.rank)
    share = _Share.of(dev, range(1), [0], engine, spare=spare)
    assert share.items == [] and share.largest == 1 and share.filler == spare
    with pytest.raises(ValueError, match="no item of its own"):
        _Share.of(dev, range(1), [0], engine)


# ------------------------------------------------------------------------------ dev evaluation

class CountingEngine(TorchEngine):
    """TorchEngine counting its forwards outside training (the dev evaluations')."""

    instances: list = []

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.eval_forwards = 0
        CountingEngine.instances.append(self)

    def forward(self, **inputs):
        self.eval_forwards += not self.model.training
        return super().forward(**inputs)


def _adapted(setup, make_model, arch):
    from ia2dist.config import AdapterConfig
    from ia2dist.model.adapters import apply_adapter

    base = copy.deepcopy(setup["base"]) if arch == "llama" else make_model(arch, setup["tok"])
    for p in base.parameters():
        p.requires_grad_(False)
    return apply_adapter(base, AdapterConfig(), seed=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])  # (records from the Llama teacher)
@pytest.mark.parametrize("objective", ["ce", "kl", "ia2", "ia2+ce"])
def test_dev_loss_does_not_depend_on_the_eval_batch(setup, make_model, arch, objective):
    """The dev objective of items of unequal lengths, one item per forward vs all in one padded
    forward, left or right padded (GPT-2's absolute positions show any position shift)."""
    from ia2dist.student.trainer import dev_loss

    model = _adapted(setup, make_model, arch)
    items = setup["cls"][:3] + setup["qa"]
    engine = CountingEngine(model)
    values = {}
    for side in ("right", "left"):
        for eval_batch in (1, 2, len(items)):
            options = TrainOptions(pad_id=0, padding_side=side, eval_batch_size=eval_batch)
            before = engine.eval_forwards
            values[side, eval_batch] = dev_loss(engine, items, objective, cfg(), options)
            assert engine.eval_forwards - before == -(-len(items) // eval_batch)
    one_by_one = values["right", 1]
    assert math.isfinite(one_by_one) and one_by_one > 0
    for key, value in values.items():
        assert value == pytest.approx(one_by_one, rel=1e-5), key


@pytest.mark.parametrize("side", ["right", "left"])
def test_dev_evaluations_in_one_forward_give_the_same_training(setup, side):
    """train(): each dev evaluation in ONE forward (eval_batch_size >= dev items) instead of one
    per micro-batch; the dev losses, the early-stopping decisions and the restored state agree."""
    items, dev = setup["cls"][:3] + setup["qa"][:2], setup["cls"][3:] + setup["qa"][2:]
    runs = []
    for eval_batch in (None, 16):
        CountingEngine.instances.clear()
        model = lora_student(setup["base"])
        result = train(model, items, dev, "ia2_then_sft",
                       cfg(micro_batch_size=1, eval_every=1, patience=2, max_steps=6), seed=0,
                       options=TrainOptions(engine_factory=CountingEngine.from_config,
                                            padding_side=side, eval_batch_size=eval_batch))
        evaluations = sum("dev_loss" in h for h in result.history)
        assert sum(e.eval_forwards for e in CountingEngine.instances) == (
            evaluations * (len(dev) if eval_batch is None else 1))
        runs.append((result, {n: p.detach().clone() for n, p in model.named_parameters()
                              if p.requires_grad}))
    (micro, micro_state), (batched, batched_state) = runs
    assert [h.get("dev_loss") for h in batched.history] == pytest.approx(
        [h.get("dev_loss") for h in micro.history], rel=1e-5)
    assert [p["best_step"] for p in batched.phases] == [p["best_step"] for p in micro.phases]
    for name, value in micro_state.items():
        torch.testing.assert_close(batched_state[name], value, rtol=1e-4, atol=1e-6)


def test_eval_batch_size_must_be_positive(setup):
    with pytest.raises(IA2Error, match="eval.batch_size=0"):
        train(lora_student(setup["base"]), setup["cls"][:2], setup["cls"][2:3], "sft", cfg(),
              seed=0, options=TrainOptions(eval_batch_size=0))
