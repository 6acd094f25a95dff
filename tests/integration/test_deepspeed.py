"""DeepSpeed ZeRO data parallelism: 2-rank runs on CPU (config filling:
tests/unit/test_dsconfig.py).

The distributed tests launch this file with torchrun (2 processes, gloo, DS_ACCELERATOR=cpu), the
way users launch training; every scenario in ``SCENARIOS`` runs in that one launch and writes its
per-rank results, which the tests compare with the single-process ``TorchEngine`` run of the same
scenario (same seed, items and global batch). Run as a script, the file is that worker.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from ia2dist.config import AdapterConfig, TrainConfig
from tests.helpers import torchrun

REPO = Path(__file__).resolve().parents[2]
DS_CONFIGS = REPO / "ia2dist" / "ds_configs"

#: Relative tolerance of distributed vs single-process per-step (and dev) losses. Both runs are
#: float32 and differ only in summation order (per-rank partial sums, the gloo reduction); the
#: largest relative difference measured over all scenarios was 3.4e-7.
LOSS_RTOL = 1e-4
#: Tolerance on final trainable weights. Adam divides by the gradient's running RMS, so float noise
#: on near-zero gradient entries moves weights by up to lr-sized amounts; measured <= 5e-5.
WEIGHT_ATOL = 5e-4
#: Relative tolerance on each optimizer step's global gradient norm (measured <= 6.1e-7).
GRAD_NORM_RTOL = 1e-4

_TRAIN = dict(lr=1e-2, epochs=50, batch_size=4, micro_batch_size=1, patience=0, eval_every=2,
              max_steps=6)

#: name -> method, adapter, template, train config overrides, dev set kind, whether to save, dev
#: items per forward (eval_batch; default the micro-batch size, 1, with a filler forward on rank 1).
#: 5 training items with a global batch of 4: the last batch of each epoch has one item, so rank 1
#: runs a zero-weighted filler micro-batch there.
SCENARIOS = {
    "ia2_zero3": dict(method="ia2", adapter="lora", template="zero3.json", train={}, dev=None),
    "sft_zero3": dict(method="sft", adapter="lora", template="zero3.json",
                      train=dict(grad_clip=0.05), dev=None, reload=True),
    "ia2_then_sft_zero3": dict(method="ia2_then_sft", adapter="lora", template="zero3.json",
                               train=dict(max_steps=4, eval_every=1), dev="plain", save=True,
                               eval_batch=2),
    "early_stop_zero3": dict(method="sft_then_ia2", adapter="lora", template="zero3.json",
                             train=dict(batch_size=2, patience=2, eval_every=1, max_steps=16),
                             dev="contradicting", record=True),
    "sft_zero3_offload": dict(method="sft", adapter="lora", template="zero3_offload.json",
                              train=dict(max_steps=3), dev=None),
    "full_zero3": dict(method="sft", adapter="full", template="zero3.json",
                       train=dict(lr=1e-3, max_steps=3), dev=None, save=True),
    "ia2_plus_sft_zero2": dict(method="ia2_plus_sft", adapter="lora", template="zero2.json",
                               train={}, dev="plain", reload=True),
}


# ------------------------------------------------------------------------------ shared helpers

def train_config(scenario: dict) -> TrainConfig:
    return TrainConfig(**{**_TRAIN, **scenario["train"]})


def make_student(base, adapter: str):
    from ia2dist.model.adapters import apply_adapter

    return apply_adapter(copy.deepcopy(base), AdapterConfig(type=adapter), seed=0)


def scenario_items(data: dict, scenario: dict):
    train_items = data["early_train"] if scenario["dev"] == "contradicting" else data["train"]
    dev_items = {None: [], "plain": data["dev"], "contradicting": data["contradicting"]}
    return train_items, dev_items[scenario["dev"]]


# ------------------------------------------------------------------------------ 2-rank runs

def _extracted_items(base, tok):
    """Student items whose teacher records come from ``extract`` on the frozen base with demos."""
    from ia2dist.student.batching import StudentItem
    from ia2dist.teacher.extract import extract

    groups = [([("the movie was great", "1"), ("a dull and boring plot", "0"),
                ("great great film", "1"), ("boring and dull", "0"), ("the plot was great", "1"),
                ("a dull movie", "0")], "Text:{}\nLabel:", 1, "cls"),
              ([("What is 12 plus 30?", "42"), ("What is 3 plus 4?", "7"),
                ("What is 2 plus 2?", "4")], "Question:{}\nAnswer:", 3, "qa")]
    items = {}
    for pairs, template, num_tokens, prefix in groups:
        queries = [template.format(x) for x, _ in pairs]
        demos = [q + a for q, (_, a) in zip(queries, pairs)]
        prompts = ["\n\n".join(demos[:i] + demos[i + 1:] + [query])
                   for i, query in enumerate(queries)]
        uids = [f"{prefix}{i}" for i in range(len(pairs))]
        records = extract(base, tok, prompts, uids, max_new_tokens=num_tokens, batch_size=4)
        out = []
        for uid, query, (_, answer), rec in zip(uids, queries, pairs, records):
            target = tok(answer, add_special_tokens=False)["input_ids"]
            if num_tokens > 1:
                target = target + [tok.eos_token_id]
            out.append(StudentItem(uid, tok(query)["input_ids"], target, rec))
        items[prefix] = out
    return items


@pytest.fixture(scope="module")
def data(make_tokenizer, make_model):
    tok = make_tokenizer(add_bos=True)
    base = make_model("llama", tok, seed=0)
    for p in base.parameters():
        p.requires_grad_(False)
    items = _extracted_items(base, tok)
    cls, qa = items["cls"], items["qa"]
    from ia2dist.student.batching import StudentItem

    labels = sorted({tuple(it.target_ids) for it in cls})
    assert len(labels) == 2
    early_train = cls[:4]
    flipped = {labels[0]: list(labels[1]), labels[1]: list(labels[0])}
    contradicting = [StudentItem(f"dev{i}", it.prompt_ids, flipped[tuple(it.target_ids)],
                                 it.teacher) for i, it in enumerate(early_train)]
    return {"base": base, "train": [cls[0], qa[0], cls[1], qa[1], cls[2]],
            "dev": [cls[3], qa[2], cls[4]], "early_train": early_train,
            "contradicting": contradicting}


@pytest.fixture(scope="module")
def launched(data, tmp_path_factory):
    """All scenarios in one 2-process torchrun launch; per-rank results and the wall time."""
    work_dir = tmp_path_factory.mktemp("ds")
    torch.save(data, work_dir / "data.pt")
    start = time.perf_counter()
    torchrun(Path(__file__), "--worker", work_dir)
    wall = time.perf_counter() - start
    ranks = [torch.load(work_dir / f"results_rank{r}.pt", weights_only=False) for r in (0, 1)]
    return {"ranks": ranks, "dir": work_dir, "wall": wall}


@pytest.fixture(scope="module")
def reference(data):
    """Single-process TorchEngine runs of every scenario: history, final trainable state and the
    gradient norm of every step (before clipping)."""
    from ia2dist.student.engines.torch_engine import TorchEngine
    from ia2dist.student.trainer import TrainOptions, train

    class NormEngine(TorchEngine):
        def step(self):
            grads = [p.grad for p in self.params.values() if p.grad is not None]
            norms.append(float(torch.nn.utils.get_total_norm(grads)))
            super().step()

    out = {}
    for name, scenario in SCENARIOS.items():
        norms: list[float] = []
        model = make_student(data["base"], scenario["adapter"])
        train_items, dev_items = scenario_items(data, scenario)
        result = train(model, train_items, dev_items, scenario["method"], train_config(scenario),
                       seed=0,
                       options=TrainOptions(engine_factory=NormEngine.from_config,
                                            eval_batch_size=scenario.get("eval_batch")))
        state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        out[name] = {"history": result.history, "phases": result.phases, "final": state,
                     "grad_norms": norms}
    return out


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_match_single_process(launched, reference, name):
    """Per-step global losses (and dev losses, per-term losses) of 2 ranks equal the single-process
    run; both ranks log the same values; the final weights agree."""
    rank0, rank1 = (r[name] for r in launched["ranks"])
    ref, scenario = reference[name], SCENARIOS[name]
    # really DeepSpeed, of the template's stage, one fresh engine per phase
    assert rank0["zero_stage"] == (3 if "zero3" in scenario["template"] else 2)
    assert rank0["partitioned"] == (rank0["zero_stage"] == 3)
    print(f"{name}: phases {rank0['phases']}")
    assert rank0["num_engines"] == len(ref["phases"])
    clip = train_config(scenario).grad_clip
    assert clip is None or max(ref["grad_norms"]) > 2 * clip  # clipping really acted
    assert [h["step"] for h in rank0["history"]] == [h["step"] for h in ref["history"]]
    assert [p["best_step"] for p in rank0["phases"]] == [p["best_step"] for p in ref["phases"]]
    for key in {k for h in ref["history"] for k in h if k.startswith(("loss", "dev_loss"))}:
        ours = [h[key] for h in rank0["history"] if key in h]
        theirs = [h[key] for h in ref["history"] if key in h]
        assert len(ours) == len(theirs) > 0, key
        assert ours == pytest.approx(theirs, rel=LOSS_RTOL), (name, key, _max_rel(ours, theirs))
        print(f"{name} {key}: max relative difference {_max_rel(ours, theirs):.2e}")
    assert rank0["history"] == rank1["history"]
    # Adam ignores the gradient's scale: the norms catch a gradient off by a constant factor
    assert rank0["grad_norms"] == pytest.approx(ref["grad_norms"], rel=GRAD_NORM_RTOL)
    print(f"{name} grad norms: max relative difference "
          f"{_max_rel(rank0['grad_norms'], ref['grad_norms']):.2e}")
    assert rank0["final"].keys() == ref["final"].keys()
    weight_diff = max(float((rank0["final"][n] - v).abs().max()) for n, v in ref["final"].items())
    print(f"{name} final weights: max abs difference {weight_diff:.2e}")
    for n, value in ref["final"].items():
        torch.testing.assert_close(rank0["final"][n], value, rtol=0, atol=WEIGHT_ATOL)
        assert torch.equal(rank0["final"][n], rank1["final"][n])


@pytest.mark.distributed
def test_early_stopping_restores_best_state_under_zero3(launched):
    """The dev loss rises under SFT on contradicting targets: the phase stops early and the gathered
    ZeRO-3 weights at its end are those of the best evaluation, not the last step. The next phase's
    losses (compared with one process in test_two_ranks_match_single_process) start from them."""
    run = launched["ranks"][0]["early_stop_zero3"]
    phase = run["phases"][0]
    assert phase["stopped_early"] and phase["steps"] == phase["best_step"] + 2
    states, restored = run["states"][0], run["restored"][0]
    best, last = states[phase["best_step"] - 1], states[-1]
    assert all(torch.equal(restored[n], best[n]) for n in best)
    assert any(not torch.equal(restored[n], last[n]) for n in best)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["sft_zero3", "ia2_plus_sft_zero2"])
def test_loaded_state_reaches_optimizer_master_weights(launched, name):
    """load_trainable_state also refreshes the optimiser's own fp32 copy: a following step with
    lr 0 (which writes the master weights back into the model) keeps the loaded weights."""
    assert launched["ranks"][0][name]["reload_kept"] is True


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["ia2_then_sft_zero3", "full_zero3"])
def test_consolidated_save_round_trip(launched, data, name):
    """save_consolidated writes the live gathered weights (never ZeRO-3's empty placeholders), and
    attach_trained in one process gets them back."""
    import copy

    from ia2dist.model.adapters import attach_trained

    run = launched["ranks"][0][name]
    loaded = attach_trained(copy.deepcopy(data["base"]), launched["dir"] / name)
    params = dict(loaded.named_parameters())
    assert run["final"], "no trainable parameters recorded"
    for n, live in run["final"].items():
        assert live.numel() > 0
        assert torch.equal(params[n].detach(), live), n
    if name == "ia2_then_sft_zero3":
        assert (launched["dir"] / name / "adapter_model.safetensors").exists()
        assert any("lora_B" in n and live.abs().max() > 0 for n, live in run["final"].items())
    else:
        assert (launched["dir"] / name / "model.safetensors").exists()


@pytest.mark.distributed
def test_launch_time(launched):
    """Guards the file's time budget (all scenarios share one launch)."""
    print(f"2-rank launch wall time: {launched['wall']:.1f} s; per scenario: "
          f"{ {k: round(v['seconds'], 1) for k, v in launched['ranks'][0].items()} }")
    assert launched["wall"] < 300


# ------------------------------------------------------------------------------ worker side

def _template(scenario: dict) -> dict:
    """The scenario's template; ZeRO-3 partitions even the tiny model's parameters (by default
    parameters under 1e5 elements stay whole on every rank, which would hide gathering bugs)."""
    template = json.loads((DS_CONFIGS / scenario["template"]).read_text())
    if template["zero_optimization"]["stage"] == 3:
        template["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return template


def _check_reload(engine, items) -> bool:
    """Load half the current weights, then one lr-0 step of a zero loss; True when the model still
    holds the loaded weights afterwards."""
    target = {n: v * 0.5 for n, v in engine.trainable_state().items()}
    engine.load_trainable_state(target)
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    engine.model.train()
    output = engine.forward(input_ids=torch.tensor([items[0].prompt_ids]))
    engine.backward(output.logits.float().sum() * 0.0)
    engine.step()
    after = engine.trainable_state()
    return all(torch.equal(after[n], target[n]) for n in target)


def _worker(work_dir: Path) -> None:
    """One rank of the launch: every scenario with DeepSpeedEngine; results for this rank."""
    torch.set_num_threads(1)
    from ia2dist.student.engines.deepspeed_engine import (DeepSpeedEngine,
                                                          DeepSpeedEngineFactory, init_distributed)
    from ia2dist.student.trainer import TrainOptions, train

    class RecordingEngine(DeepSpeedEngine):
        """Keeps the gathered trainable state after every optimizer step when ``record`` is set."""

        record = False

        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.states, self.grad_norms, self.restored = [], [], None
            engines.append(self)

        def load_trainable_state(self, state):
            super().load_trainable_state(state)
            if self.record:
                self.restored = self.trainable_state()

        def step(self):
            super().step()
            self.grad_norms.append(float(self.ds.get_global_grad_norm()))
            if self.record:
                self.states.append(self.trainable_state())

    init_distributed()
    rank = torch.distributed.get_rank()
    data = torch.load(work_dir / "data.pt", weights_only=False)
    results = {}
    for name, scenario in SCENARIOS.items():
        start = time.perf_counter()
        engines: list[RecordingEngine] = []
        RecordingEngine.record = bool(scenario.get("record"))
        model = make_student(data["base"], scenario["adapter"])
        train_items, dev_items = scenario_items(data, scenario)
        factory = DeepSpeedEngineFactory(_template(scenario), engine_class=RecordingEngine)
        result = train(model, train_items, dev_items, scenario["method"], train_config(scenario),
                       seed=0,
                       options=TrainOptions(engine_factory=factory,
                                            eval_batch_size=scenario.get("eval_batch")))
        engine = factory.engine
        assert engine is engines[-1]
        some_param = next(iter(engine.params.values()))
        partitioned = hasattr(some_param, "ds_id") and some_param.data.numel() == 0
        if scenario.get("save"):
            engine.save_consolidated(work_dir / name)
        results[name] = {"history": result.history, "phases": result.phases,
                         "final": engine.trainable_state(),
                         "states": [e.states for e in engines],
                         "restored": [e.restored for e in engines],
                         "grad_norms": [n for e in engines for n in e.grad_norms],
                         "num_engines": len(engines), "zero_stage": engine.zero_stage,
                         "partitioned": partitioned, "seconds": time.perf_counter() - start}
        if scenario.get("reload"):
            results[name]["reload_kept"] = _check_reload(engine, train_items)
        engine.destroy()
    torch.save(results, work_dir / f"results_rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    assert sys.argv[1] == "--worker", \
        "usage: torchrun ... tests/integration/test_deepspeed.py --worker DIR"
    _worker(Path(sys.argv[2]))
