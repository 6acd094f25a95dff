"""Evaluation: equal-mass ECE, single-token / generation evaluation, layer similarity, reports."""

import json
import math
import re

import numpy as np
import pytest
import torch

from ia2dist.errors import IA2Error
from ia2dist.eval.evaluate import evaluate_generation
from ia2dist.eval.evaluate import (cut_at_stop, entropies, evaluate_single_token,
                                   generation_similarity, label_set_correct, label_token_ids,
                                   last_token_logits, layer_similarity, per_example_similarity,
                                   score_generations)
from ia2dist.eval.metrics import ece_equal_mass, entropy, reliability_bins
from ia2dist.eval.report import (aggregate, reliability_diagram, select_settings, similarity_plot,
                                 summary_table, write_report)
from ia2dist.model.decode import encode
from ia2dist.records import Example, TeacherRecord
from ia2dist.teacher.extract import extract

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABELS = ["0", "1"]


def _examples(answers):
    return [Example(uid=f"ex{i}", query=f"Text:{q}\nLabel:", answer=a)
            for i, (q, a) in enumerate(zip(PROMPT_TEXTS, answers))]


PROMPT_TEXTS = ["great", "a dull and boring plot", "the movie was great and the plot was great",
                "boring", "alpha beta", "gamma delta epsilon zeta eta theta"]


# ------------------------------------------------------------------------------------- metrics

def test_ece_hand_example():
    # Sorted by confidence: 0.3(0) 0.55(0) | 0.6(1) 0.7(1) | 0.8(0) 0.9(1) 0.95(1); 7 // 3 = 2 per
    # bin, the last bin takes the remaining 3.
    #   bin 1: conf 0.425, acc 0   -> |0 - 0.425|       = 0.425,  weight 2/7
    #   bin 2: conf 0.65,  acc 1   -> |1 - 0.65|        = 0.35,   weight 2/7
    #   bin 3: conf 2.65/3, acc 2/3 -> |2/3 - 2.65/3|   = 0.65/3, weight 3/7
    # ECE = (2 * 0.425 + 2 * 0.35 + 3 * 0.65 / 3) / 7 = 2.2 / 7
    conf = [0.9, 0.8, 0.7, 0.6, 0.55, 0.3, 0.95]
    correct = [1, 0, 1, 1, 0, 0, 1]
    assert ece_equal_mass(conf, correct, n_bins=3) == pytest.approx(2.2 / 7)
    assert ece_equal_mass(torch.tensor(conf), torch.tensor(correct, dtype=torch.bool), 3) == \
        pytest.approx(2.2 / 7)


def test_reliability_bins_equal_mass_last_bin_takes_rest():
    conf = [0.9, 0.8, 0.7, 0.6, 0.55, 0.3, 0.95]
    correct = [1, 0, 1, 1, 0, 0, 1]
    bins = reliability_bins(conf, correct, n_bins=3)
    assert bins.count.tolist() == [2, 2, 3]
    np.testing.assert_allclose(bins.confidence, [0.425, 0.65, 2.65 / 3])
    np.testing.assert_allclose(bins.accuracy, [0.0, 1.0, 2 / 3])
    np.testing.assert_allclose(bins.lower, [0.3, 0.6, 0.8])
    np.testing.assert_allclose(bins.upper, [0.55, 0.7, 0.95])
    # 32 examples, 15 bins: 2 per bin, the last bin 4.
    assert reliability_bins(np.linspace(0, 1, 32), np.ones(32), 15).count.tolist() == [2] * 14 + [4]


def test_fewer_examples_than_bins_gives_one_per_bin():
    # |1 - 0.2| / 2 + |1 - 0.9| / 2 = 0.45
    assert reliability_bins([0.9, 0.2], [1, 1], 15).count.tolist() == [1, 1]
    assert ece_equal_mass([0.9, 0.2], [1, 1], 15) == pytest.approx(0.45)
    assert ece_equal_mass([0.7] * 5, [1] * 5, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        ece_equal_mass([], [], 15)


def test_entropy():
    np.testing.assert_allclose(entropy([[0.5, 0.5], [1.0, 0.0]]), [math.log(2), 0.0], atol=1e-12)
    assert entropy(torch.full((4,), 0.25)) == pytest.approx(math.log(4))


# --------------------------------------------------------------------------- single-token eval

@pytest.fixture(scope="module")
def tok(make_tokenizer):
    return make_tokenizer(add_bos=True, with_pad=False)


@pytest.fixture(scope="module")
def llama(make_model, tok):
    return make_model("llama", tok, seed=0)


def test_label_token_ids_skip_bos(tok):
    ids = label_token_ids(tok, LABELS)
    assert ids == tok.convert_tokens_to_ids(LABELS)
    assert tok.bos_token_id not in ids


def _biased(model, bias_V):
    """``model`` whose logits are exactly ``bias_V`` at every position (lm_head zeroed + hook)."""
    import copy

    biased = copy.deepcopy(model)
    with torch.no_grad():
        biased.lm_head.weight.zero_()
    biased.lm_head.register_forward_hook(lambda _m, _i, out: out + bias_V.to(out))
    return biased


def test_single_token_known_accuracy_and_confidences(tok, llama):
    one, zero = label_token_ids(tok, LABELS)[1], label_token_ids(tok, LABELS)[0]
    bias_V = torch.zeros(len(tok))
    bias_V[one], bias_V[zero] = 3.0, 2.0
    model = _biased(llama, bias_V)
    answers = ["1", "1", "0", "1"]
    examples = _examples(answers)
    prompts = [ex.query for ex in examples]
    metrics, rows = evaluate_single_token(model, tok, prompts, examples, LABELS, batch_size=3,
                                          n_bins=15)

    # "1" always wins: 3 of 4 answers are "1".
    assert metrics["accuracy"] == 0.75 and metrics["label_accuracy"] == 0.75
    assert [r["prediction"] for r in rows] == ["1"] * 4
    assert [r["correct"] for r in rows] == [True, True, False, True]
    # Logits are the bias: p1 = e^3 / (e^3 + e^2 + (V - 2)); the top 10 are "1", "0" and 8 zeros.
    e3, e2, rest = math.exp(3), math.exp(2), len(tok) - 2
    p1, p0 = e3 / (e3 + e2 + rest), e2 / (e3 + e2 + rest)
    p_other = 1 / (e3 + e2 + rest)
    ref1 = p1 / (p1 + p0 + 8 * p_other)
    label_plain = e3 / (e3 + e2)
    label_ref = math.exp(p1) / (math.exp(p1) + math.exp(p0))
    assert metrics["confidence"] == pytest.approx(p1, rel=1e-5)
    assert metrics["confidence_ref"] == pytest.approx(ref1, rel=1e-5)
    assert metrics["label_confidence"] == pytest.approx(label_plain, rel=1e-5)
    assert metrics["label_confidence_ref"] == pytest.approx(label_ref, rel=1e-5)
    # 4 examples < 15 bins: one per bin, ECE = mean |correct - conf| = (3 (1 - c) + c) / 4.
    for key, c in (("ece", p1), ("ece_ref", ref1), ("label_ece", label_plain),
                   ("label_ece_ref", label_ref)):
        assert metrics[key] == pytest.approx((3 * (1 - c) + c) / 4, rel=1e-5), key
    assert metrics["label_entropy"] == pytest.approx(
        -(label_plain * math.log(label_plain) + (1 - label_plain) * math.log(1 - label_plain)), rel=1e-5)
    assert rows[0]["label_prediction"] == "1" and rows[2]["label_gold"] == "0"

    ref_metrics, ref_rows = evaluate_single_token(model, tok, prompts, examples, LABELS,
                                                  confidence="reference")
    assert ref_metrics["ece"] == metrics["ece_ref"] and ref_metrics["ece_plain"] == metrics["ece"]
    assert ref_metrics["label_confidence"] == metrics["label_confidence_ref"]
    assert ref_rows[0]["confidence"] == rows[0]["confidence_ref"]
    assert json.loads(json.dumps(rows)) == rows  # rows are JSON-ready


def test_label_ties_count_as_correct_in_reference_mode():
    """The reference: correct iff P(gold) >= P(label) for every other label."""
    probs = torch.tensor([[0.3, 0.3, 0.1], [0.2, 0.5, 0.2], [0.1, 0.1, 0.1], [0.4, 0.2, 0.1]])
    gold = torch.tensor([1, 0, 2, 0])
    reference = [all(float(row[g]) >= float(row[k]) for k in range(3) if k != g)
                 for row, g in zip(probs, gold.tolist())]
    assert label_set_correct(probs, gold, "correct").tolist() == reference == [True, False, True,
                                                                               True]
    assert label_set_correct(probs, gold, "argmax").tolist() == [False, False, False, True]
    with pytest.raises(IA2Error, match="eval.label_ties"):
        label_set_correct(probs, gold, "maybe")


def test_reference_entropies():
    """The reference: H = -sum p log(p + 1e-10) of the top-10 renormalised and of a softmax over
    the label probabilities."""
    torch.manual_seed(0)
    probs_NV = torch.randn(5, 50).softmax(-1)
    label_NC = probs_NV[:, [3, 7]]
    got = entropies(probs_NV, label_NC)
    for i in range(5):
        top = np.sort(probs_NV[i].double().numpy())[::-1][:10]
        top = top / top.sum()
        assert float(got["top1_ref"][i]) == pytest.approx(-np.sum(top * np.log(top + 1e-10)))
        lab = label_NC[i].double().numpy()
        soft = np.exp(lab) / np.sum(np.exp(lab))
        assert float(got["label_ref"][i]) == pytest.approx(-np.sum(soft * np.log(soft + 1e-10)))
        assert float(got["top1_plain"][i]) == pytest.approx(float(entropy(probs_NV[i])), rel=1e-6)
        assert float(got["label_plain"][i]) == pytest.approx(
            float(entropy(label_NC[i] / label_NC[i].sum())), rel=1e-6)


def test_single_token_ties_and_entropy_keys(tok, llama):
    """Equal logits for both labels: a tie, correct for every gold label in reference mode."""
    one, zero = label_token_ids(tok, LABELS)[1], label_token_ids(tok, LABELS)[0]
    bias_V = torch.zeros(len(tok))
    bias_V[one] = bias_V[zero] = 3.0
    model = _biased(llama, bias_V)
    examples = _examples(["1", "0", "1", "0"])
    prompts = [ex.query for ex in examples]
    ties, _ = evaluate_single_token(model, tok, prompts, examples, LABELS, label_ties="correct",
                                    confidence="reference")
    argmax, _ = evaluate_single_token(model, tok, prompts, examples, LABELS)
    assert ties["label_accuracy"] == 1.0 and argmax["label_accuracy"] == 0.5
    assert ties["label_entropy"] == ties["label_entropy_ref"] == pytest.approx(math.log(2))
    assert ties["entropy"] == ties["entropy_ref"] and argmax["entropy"] == argmax["entropy_plain"]
    assert argmax["label_entropy"] == pytest.approx(math.log(2))


def test_single_token_padding_invariance(tok, llama):
    examples = _examples(["1", "0", "1", "0", "1", "0"])
    prompts = [ex.query for ex in examples]
    single, rows1 = evaluate_single_token(llama, tok, prompts, examples, LABELS, batch_size=1)
    batched, rows4 = evaluate_single_token(llama, tok, prompts, examples, LABELS, batch_size=4)
    assert single.keys() == batched.keys()
    for key in single:
        assert batched[key] == pytest.approx(single[key], abs=1e-5), key
    assert [r["prediction"] for r in rows1] == [r["prediction"] for r in rows4]
    # And each row equals an unpadded forward of that prompt alone.
    ids = [tok(p)["input_ids"] for p in prompts]
    logits = last_token_logits(llama, ids, pad_id=0, batch_size=4)
    for i, seq in enumerate(ids):
        alone = llama(input_ids=torch.tensor([seq])).logits[0, -1]
        torch.testing.assert_close(logits[i], alone, atol=1e-5, rtol=1e-5)


def test_single_token_prompt_tuning_padding_invariance(tok, llama):
    import copy

    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(llama),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ids = [tok(p)["input_ids"] for p in PROMPT_TEXTS]
    batched = last_token_logits(model, ids, pad_id=0, batch_size=4, num_virtual_tokens=3)
    for i, seq in enumerate(ids):
        alone = last_token_logits(model, [seq], pad_id=0, batch_size=1, num_virtual_tokens=3)[0]
        torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-5)
        full = model(input_ids=torch.tensor([seq])).logits
        assert full.shape[1] == len(seq) + 3
        torch.testing.assert_close(alone, full[0, -1], atol=1e-5, rtol=1e-5)


def test_single_token_rejects_unknown_answer(tok, llama):
    examples = [Example(uid="bad", query="Text:x\nLabel:", answer="7")]
    with pytest.raises(IA2Error, match="bad"):
        evaluate_single_token(llama, tok, ["Text:x\nLabel:"], examples, LABELS)


# ------------------------------------------------------------------------------ generation eval

def _last_number(text):
    numbers = re.findall(r"-?\d+", text)
    return numbers[-1] if numbers else None


def test_score_generations_parse_and_exact_match():
    examples = [Example("a", "Q1", "12 + 30 = 42\n#### 42"), Example("b", "Q2", "#### 8"),
                Example("c", "Q3", "#### 5")]
    texts = ["12 + 30 = 42\n#### 42\n\nQuestion: 99", "#### 7", "no number here"]
    metrics, rows = score_generations(texts, examples, _last_number, stop_strings=("\n\n",))
    assert [r["prediction"] for r in rows] == ["42", "7", None]
    assert [r["gold"] for r in rows] == ["42", "8", "5"]
    assert [r["correct"] for r in rows] == [True, False, False]
    assert metrics["accuracy"] == pytest.approx(1 / 3) and metrics["parse_failures"] == 1
    # Two failed parses are not a match.
    _, rows = score_generations(["x"], [Example("d", "Q", "none")], _last_number)
    assert rows[0]["correct"] is False
    assert cut_at_stop("a\nb\n\nc###d", ("###", "\n\n")) == "a\nb"
    assert cut_at_stop("abc", ()) == "abc"


def _naive_greedy(model, tok, prompt, max_new_tokens):
    ids = tok(prompt)["input_ids"]
    out = []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == tok.eos_token_id:
            break
    return out


def test_evaluate_generation_exact_match_on_own_greedy_output(tok, llama):
    prompts = ["Question:What is 12 plus 30?\nAnswer:", "Question:Which planet is red?\nAnswer:",
               "Question:alpha\nAnswer:"]
    greedy = [tok.decode(_naive_greedy(llama, tok, p, 6), skip_special_tokens=True) for p in prompts]
    examples = [Example(f"g{i}", p, g) for i, (p, g) in enumerate(zip(prompts, greedy))]
    examples[2] = Example("g2", prompts[2], greedy[2] + "different")
    metrics, rows = evaluate_generation(llama, tok, prompts, examples, lambda s: s.strip(),
                                        max_new_tokens=6, stop_strings=(), batch_size=2)
    assert [r["response"] for r in rows] == greedy
    assert [r["correct"] for r in rows] == [True, True, False]
    assert metrics["accuracy"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------- layer similarity

def test_layer_similarity_is_one_for_own_activations(tok, llama, make_model):
    """The model compared with its own no-demo extraction (mixed response lengths, padded
    batches) is identical at every layer; another model is not."""
    prompts = [ex.query for ex in _examples(["1"] * 5)]
    records = extract(llama, tok, prompts, [f"r{i}" for i in range(5)], max_new_tokens=4,
                      batch_size=5, act_dtype=torch.float32)
    records[1] = TeacherRecord("r1", records[1].response_ids[:1], records[1].acts_LTD[:, :1])
    prompt_ids = encode(tok, prompts)
    sims = layer_similarity(llama, tok, prompt_ids, records, batch_size=3)
    assert len(sims) == llama.config.num_hidden_layers
    assert sims == pytest.approx([1.0] * len(sims), abs=1e-5)

    other = make_model("llama", tok, seed=1)
    assert max(layer_similarity(other, tok, prompt_ids, records, batch_size=3)) < 0.9


def test_layer_similarity_prompt_tuning_offsets_virtual_tokens(tok, llama):
    import copy

    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(llama),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    prompts = PROMPT_TEXTS[:4]
    records = extract(model, tok, prompts, list("abcd"), max_new_tokens=3, batch_size=4,
                      act_dtype=torch.float32)
    sims = layer_similarity(model, tok, encode(tok, prompts), records, batch_size=2,
                            num_virtual_tokens=3)
    assert sims == pytest.approx([1.0] * len(sims), abs=1e-5)


def test_per_example_similarity_is_the_reference_mean():
    """Per example: cosine over D at the first min(T_a, T_b) positions, mean over them; then the
    mean over examples (a long response does not outweigh a short one)."""
    torch.manual_seed(0)
    a = [torch.randn(2, 5, 8), torch.randn(2, 1, 8), torch.randn(2, 0, 8)]
    b = [torch.randn(2, 3, 8), torch.randn(2, 4, 8), torch.randn(2, 2, 8)]
    expected = []
    for x, y in zip(a[:2], b[:2]):
        t = min(x.shape[1], y.shape[1])
        expected.append(torch.nn.functional.cosine_similarity(x[:, :t], y[:, :t], dim=2).mean(1))
    assert per_example_similarity(a, b) == pytest.approx(torch.stack(expected).mean(0).tolist())
    with pytest.raises(IA2Error, match="differ in layers"):
        per_example_similarity([torch.zeros(3, 1, 8)], [torch.zeros(2, 1, 8)])


def test_generation_similarity_on_own_greedy_responses(tok, llama, make_model):
    """The model against its own extraction is 1 everywhere; at T = 1 it equals the teacher-forced
    similarity; another model generating its own (different) responses is compared per example."""
    prompts = [ex.query for ex in _examples(["1"] * 4)]
    own = extract(llama, tok, prompts, list("abcd"), max_new_tokens=4, batch_size=4,
                  act_dtype=torch.float32)
    sims = generation_similarity(llama, tok, prompts, own, max_new_tokens=4, batch_size=2)
    assert sims == pytest.approx([1.0] * llama.config.num_hidden_layers, abs=1e-5)
    other = make_model("llama", tok, seed=1)
    one = extract(llama, tok, prompts, list("abcd"), max_new_tokens=1, act_dtype=torch.float32)
    assert generation_similarity(other, tok, prompts, one, max_new_tokens=1) == pytest.approx(
        layer_similarity(other, tok, encode(tok, prompts), one), abs=1e-5)
    mixed = generation_similarity(other, tok, prompts, own, max_new_tokens=4)
    theirs = extract(other, tok, prompts, list("abcd"), max_new_tokens=4, act_dtype=torch.float32)
    assert mixed == pytest.approx(per_example_similarity([r.acts_LTD for r in theirs],
                                                         [r.acts_LTD for r in own]), abs=1e-5)


def test_layer_similarity_rejects_mismatched_records(tok, llama):
    bad = TeacherRecord(uid="x", response_ids=torch.tensor([5, 6]), acts_LTD=torch.zeros(3, 2, 64))
    with pytest.raises(IA2Error, match="x"):
        layer_similarity(llama, tok, [[1, 2, 3]], [bad])


# ------------------------------------------------------------------------------------- reports

def _results():
    rows = []
    for method, acc in (("base", 0.5), ("sft", 0.7), ("ia2_then_sft", 0.8)):
        for seed, delta in ((0, -0.1), (1, 0.1)):
            rows.append({"method": method, "n": 4, "seed": seed, "accuracy": acc + delta,
                         "ece": 0.1, "label_accuracy": acc, "label_ece": 0.2,
                         "layer_similarity": [0.5, 0.7] if method != "base" else [0.3, 0.5]})
    return rows


def test_aggregate_and_summary_table():
    agg = aggregate(_results())
    assert [e["method"] for e in agg] == ["base", "sft", "ia2_then_sft"]
    sft = agg[1]
    assert sft["num_train"] == 4 and sft["num_seeds"] == 2
    assert sft["accuracy_mean"] == pytest.approx(0.7) and sft["accuracy_std"] == pytest.approx(0.1)
    assert sft["similarity_mean"] == pytest.approx(0.6)
    assert sft["similarity_layers"] == pytest.approx([0.5, 0.7])
    table = summary_table(_results())
    lines = table.strip().splitlines()
    assert lines[0].startswith("| Method | N | Runs | Accuracy | ECE")
    assert len(lines) == 2 + 3
    for method in ("base", "sft", "ia2_then_sft"):
        assert any(line.startswith(f"| {method} |") for line in lines)
    assert "| sft | 4 | 2 | 0.700 ± 0.100 | 0.100 ± 0.000 | 0.700 ± 0.000 | 0.200 ± 0.000 | 0.600 |" \
        in table
    # Generation runs have no label metrics: shown as '-'.
    assert "| gen | 8 | 1 | 0.250 ± 0.000 | - | - | - | - |" in summary_table(
        [{"method": "gen", "num_train": 8, "seed": 0, "accuracy": 0.25}])


def _read_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(path)


def test_plots_are_valid_pngs(tmp_path):
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.4, 1.0, 300)
    per_method = {"sft (overconfident)": (conf, rng.uniform(size=300) < conf - 0.25),
                  "ia2_then_sft": (conf, rng.uniform(size=300) < conf), "tiny": ([0.8], [True])}
    image = _read_png(reliability_diagram(per_method, tmp_path / "rel.png", n_bins=15))
    assert image.shape[1] > image.shape[0] > 300  # one row of three panels
    _read_png(similarity_plot({"sft": [0.5, 0.6, 0.4], "ia2": [0.9, 0.8, 0.85]}, tmp_path / "s.png"))


def test_write_report(tmp_path):
    results = _results()
    for row in results:  # predictions.json where the pipeline writes them
        run = tmp_path / f"N4_seed{row['seed']}" / row["method"]
        run.mkdir(parents=True)
        preds = [{"uid": str(i), "confidence": 0.5 + i / 40, "correct": i % 2 == 0} for i in range(20)]
        (run / "predictions.json").write_text(json.dumps(preds))
    summary = write_report(results, tmp_path, task="sst2", n_bins=15)
    assert summary["N4/sft/accuracy_mean"] == pytest.approx(0.7)
    assert (tmp_path / "summary.md").read_text().startswith("# sst2 results")
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert len(stored["runs"]) == 6 and len(stored["aggregate"]) == 3
    for name in ("reliability", "similarity", "accuracy"):
        _read_png(tmp_path / f"{name}.png")


def test_write_report_generation_task_has_no_reliability(tmp_path):
    results = [{"method": m, "n": n, "seed": 0, "accuracy": 0.5, "num_eval": 10}
               for m in ("base", "sft") for n in (2, 4)]
    summary = write_report(results, tmp_path, task="gsm8k")
    assert summary["N4/sft/accuracy_mean"] == 0.5
    _read_png(tmp_path / "accuracy.png")
    assert not (tmp_path / "reliability.png").exists()
    assert not (tmp_path / "similarity.png").exists()
    assert "| sft | 2 | 1 | 0.500 ± 0.000 | - | - | - | - |" in (tmp_path / "summary.md").read_text()


# ---------------------------------------------------------------- sweeps and out-of-distribution


def _sweep_rows():
    """sft at N=4 over two learning rates, 2 seeds, in-distribution and on finsen; base rows."""
    rows = [{"method": "base", "n": 4, "seed": s, "accuracy": 0.5} for s in (0, 1)]
    scores = {"lr0.0001": (0.60, 0.80, 0.40), "lr0.001": (0.70, 0.50, 0.90)}
    for setting, (test, dev, ood) in scores.items():
        lr = float(setting[2:])
        for seed, delta in ((0, -0.05), (1, 0.05)):
            common = {"method": "sft", "n": 4, "seed": seed, "setting": setting, "lr": lr,
                      "label_type": "ground_truth"}
            rows.append({**common, "accuracy": test + delta, "dev_accuracy": dev,
                         "dev_loss": 1.0})
            rows.append({**common, "eval_set": "finsen", "accuracy": ood + delta})
    return rows


def test_selection_on_test_picks_the_best_test_mean_per_eval_set():
    kept, choices = select_settings(_sweep_rows(), "test", task="sst2")
    by_set = {c["eval_set"]: c for c in choices}
    assert by_set[None]["setting"] == "lr0.001" and by_set[None]["score"] == pytest.approx(0.7)
    assert by_set["finsen"]["setting"] == "lr0.001" and by_set["finsen"]["lr"] == 1e-3
    assert by_set[None]["candidates"] == pytest.approx({"lr0.0001": 0.6, "lr0.001": 0.7})
    assert len(kept) == 2 + 4 and all(r.get("setting") in (None, "lr0.001") for r in kept)


def test_selection_on_dev_ignores_the_test_items():
    rows = _sweep_rows()
    kept, choices = select_settings(rows, "dev", task="sst2")
    assert {c["setting"] for c in choices} == {"lr0.0001"}  # dev 0.8 > 0.5, on every eval set
    assert "dev accuracy" in choices[0]["criterion"]
    # ties on dev accuracy: the lower dev loss wins; then grid order
    for row in rows:
        row["dev_accuracy"] = 0.5
        row["dev_loss"] = 0.2 if row.get("setting") == "lr0.001" else 0.4
    assert {c["setting"] for c in select_settings(rows, "dev")[1]} == {"lr0.001"}
    for row in rows:
        row.pop("dev_accuracy", None), row.pop("dev_loss", None)
    with pytest.raises(ValueError, match="dev_accuracy or dev_loss"):
        select_settings(rows, "dev")


def test_report_labels_the_selection_and_has_ood_sections(tmp_path):
    summary = write_report(_sweep_rows(), tmp_path, task="sst2", selection="test")
    text = (tmp_path / "summary.md").read_text()
    assert "## Hyperparameter selection" in text and "ON THE EVALUATED ITEMS" in text
    assert "## Out-of-distribution evaluation" in text and "### finsen" in text
    assert "| sft | 4 | 2 | ground_truth | lr0.001 | 0.700 ± 0.050 |" in text
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored["selection"]["rule"] == "test" and len(stored["selection"]["choices"]) == 2
    assert {e["setting"] for e in stored["grid"]} == {"lr0.0001", "lr0.001"}
    assert [e["method"] for e in stored["ood"]["finsen"]] == ["sft"]
    assert stored["ood"]["finsen"][0]["accuracy_mean"] == pytest.approx(0.9)
    assert summary["finsen/N4/sft/ground_truth/accuracy_mean"] == pytest.approx(0.9)
    assert summary["N4/base/accuracy_mean"] == 0.5
    write_report(_sweep_rows(), tmp_path, task="sst2", selection="dev")
    assert "eval.selection = dev" in (tmp_path / "summary.md").read_text()
