"""Losses: hand computations on explicit tensors and the (sum, count) properties."""

import math

import pytest
import torch

from ia2dist.losses import IGNORE_INDEX, ce_loss, combined, ia2_loss, normalized, soft_ce_loss


def _split_sum(fn, parts):
    """sum / count accumulated over ``parts`` (each a tuple of argument slices)."""
    total, count = 0.0, 0
    for args in parts:
        s, c = fn(*args)
        total, count = total + float(s.detach()), count + c
    return total / count


# ------------------------------------------------------------------------------------------------ CE

def test_ce_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    total, count = ce_loss(logits, torch.tensor([1, 0]))
    # -log(1/2) - log(3/4)
    assert count == 2
    assert float(total) == pytest.approx(math.log(2) - math.log(0.75), rel=1e-6)


def test_ce_ignores_masked_targets():
    logits = torch.randn(5, 7)
    targets = torch.tensor([1, 2, IGNORE_INDEX, 3, IGNORE_INDEX])
    total, count = ce_loss(logits, targets)
    keep = targets != IGNORE_INDEX
    ref_total, ref_count = ce_loss(logits[keep], targets[keep])
    assert count == ref_count == 3
    assert torch.allclose(total, ref_total)


def test_ce_split_invariance():
    torch.manual_seed(0)
    logits, targets = torch.randn(10, 11), torch.randint(0, 11, (10,))
    whole = _split_sum(ce_loss, [(logits, targets)])
    parts = _split_sum(ce_loss, [(logits[:3], targets[:3]), (logits[3:4], targets[3:4]),
                                 (logits[4:], targets[4:])])
    assert parts == pytest.approx(whole, rel=1e-6)


# ------------------------------------------------------------------------------------ soft-label KL

def _dense_teacher(ids, logprobs, vocab):
    p = torch.exp(logprobs)
    rest = (1 - p.sum(-1, keepdim=True)).clamp_min(0) / (vocab - ids.shape[-1])
    dense = rest.expand(ids.shape[0], vocab).clone()
    return dense.scatter(-1, ids, p)


def test_kl_topk_by_hand():
    """V = 4, k = 2: teacher p = (0.5, 0.3) on tokens 2, 0; the rest 0.2 -> 0.1 each on 1 and 3."""
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    ids = torch.tensor([[2, 0]])
    logprobs = torch.log(torch.tensor([[0.5, 0.3]]))
    total, count = soft_ce_loss(logits, ids, logprobs)
    p = {0: 0.3, 1: 0.1, 2: 0.5, 3: 0.1}
    q = {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}
    expected = sum(p[v] * math.log(p[v] / q[v]) for v in range(4))
    assert count == 1
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_kl_topk_matches_dense_distribution():
    torch.manual_seed(1)
    vocab, k = 13, 4
    logits = torch.randn(6, vocab)
    teacher = torch.log_softmax(torch.randn(6, vocab) * 2, -1)
    logprobs, ids = teacher.topk(k, dim=-1)
    dense = _dense_teacher(ids, logprobs, vocab)
    assert torch.allclose(dense.sum(-1), torch.ones(6))
    ref = (dense * (dense.log() - torch.log_softmax(logits, -1))).sum()
    total, count = soft_ce_loss(logits, ids, logprobs)
    assert count == 6
    assert float(total) == pytest.approx(float(ref), rel=1e-5)


def test_kl_full_distribution_both_forms():
    torch.manual_seed(2)
    logits = torch.randn(3, 9)
    teacher = torch.log_softmax(torch.randn(3, 9), -1)
    ref = (teacher.exp() * (teacher - torch.log_softmax(logits, -1))).sum()
    full, _ = soft_ce_loss(logits, None, teacher)
    perm = torch.stack([torch.randperm(9) for _ in range(3)])
    as_topk, _ = soft_ce_loss(logits, perm, teacher.gather(-1, perm))
    assert float(full) == pytest.approx(float(ref), rel=1e-5)
    assert float(as_topk) == pytest.approx(float(ref), rel=1e-5)


def test_kl_nonnegative_and_zero_on_equal_distributions():
    torch.manual_seed(3)
    for _ in range(5):
        logits = torch.randn(4, 10)
        teacher = torch.log_softmax(torch.randn(4, 10) * 3, -1)
        assert float(soft_ce_loss(logits, None, teacher)[0]) >= -1e-6
        lp, ids = teacher.topk(3, -1)
        assert float(soft_ce_loss(logits, ids, lp)[0]) >= -1e-6
    logits = torch.randn(4, 10)
    same = torch.log_softmax(logits, -1)
    assert float(soft_ce_loss(logits, None, same)[0]) == pytest.approx(0.0, abs=1e-5)


def test_kl_zero_when_student_equals_topk_teacher():
    """A student that is exactly the top-k + uniform-rest distribution has zero KL."""
    vocab = 8
    ids = torch.tensor([[5, 1, 2]])
    logprobs = torch.log(torch.tensor([[0.4, 0.3, 0.2]]))
    student_logits = _dense_teacher(ids, logprobs, vocab).log()
    assert float(soft_ce_loss(student_logits, ids, logprobs)[0]) == pytest.approx(0.0, abs=1e-6)


def test_kl_split_invariance_and_teacher_detached():
    torch.manual_seed(4)
    logits = torch.randn(7, 12, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(7, 12), -1).requires_grad_(True)
    lp, ids = teacher.topk(5, -1)
    whole = _split_sum(soft_ce_loss, [(logits, ids, lp)])
    parts = _split_sum(soft_ce_loss, [(logits[:2], ids[:2], lp[:2]), (logits[2:], ids[2:], lp[2:])])
    assert parts == pytest.approx(whole, rel=1e-6)
    soft_ce_loss(logits, ids, lp)[0].backward()
    assert teacher.grad is None and logits.grad is not None


# ---------------------------------------------------------------------------------------------- IA2

def test_ia2_by_hand():
    """L=2, K=2, D=2: sum = sum err^2 / D; sum/count = L x mean(err^2) = sum of per-layer MSE."""
    student = torch.tensor([[[1.0, 2.0], [0.0, 0.0]],
                            [[3.0, 3.0], [1.0, -1.0]]])
    teacher = torch.tensor([[[0.0, 2.0], [0.0, 1.0]],
                            [[1.0, 3.0], [1.0, 1.0]]])
    total, count = ia2_loss(student, teacher)
    # layer 0: errors 1, 0, 0, 1 -> 2 ; layer 1: 4, 0, 0, 4 -> 8 ; / D = 5
    assert count == 2
    assert float(total) == pytest.approx(5.0)
    reference = student.shape[0] * ((student - teacher) ** 2).mean()
    per_layer_mse = sum(((student[l] - teacher[l]) ** 2).mean() for l in range(2))
    assert float(total) / count == pytest.approx(float(reference))
    assert float(total) / count == pytest.approx(float(per_layer_mse))


def test_ia2_zero_on_identical_and_layer_weights():
    torch.manual_seed(5)
    acts = torch.randn(3, 4, 6)
    assert float(ia2_loss(acts, acts.clone())[0]) == 0.0
    teacher = torch.randn(3, 4, 6)
    per_layer = [float(ia2_loss(acts[l:l + 1], teacher[l:l + 1])[0]) for l in range(3)]
    weighted, _ = ia2_loss(acts, teacher, layer_weights=[1.0, 0.0, 2.0])
    assert float(weighted) == pytest.approx(per_layer[0] + 2 * per_layer[2], rel=1e-6)


def test_ia2_teacher_norm_by_hand():
    """teacher_norm divides each layer's error by the teacher's mean square over the example."""
    student = torch.zeros(2, 2, 2)
    teacher = torch.tensor([[[1.0, 1.0], [1.0, 1.0]],      # layer 0: mean square 1
                            [[2.0, 2.0], [2.0, 2.0]]])     # layer 1: mean square 4
    total, count = ia2_loss(student, teacher, "teacher_norm")
    # raw per-layer sums over k of mean_d err^2: layer 0 -> 2, layer 1 -> 8; normalised: 2/1 + 8/4
    assert count == 2
    assert float(total) == pytest.approx(4.0)


def test_ia2_teacher_norm_does_not_depend_on_batch_neighbours():
    torch.manual_seed(6)
    s, t = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    t[:, 3:] *= 10  # second example much larger
    example = torch.tensor([0, 0, 0, 1, 1])
    whole, _ = ia2_loss(s, t, "teacher_norm", example_idx_K=example)
    first, _ = ia2_loss(s[:, :3], t[:, :3], "teacher_norm")
    second, _ = ia2_loss(s[:, 3:], t[:, 3:], "teacher_norm")
    assert float(whole) == pytest.approx(float(first + second), rel=1e-6)


def test_ia2_split_invariance_and_padding_free_selection():
    """Sums over any split of the positions divided by the total count equal the whole."""
    torch.manual_seed(7)
    s, t = torch.randn(3, 9, 5), torch.randn(3, 9, 5)
    whole = _split_sum(ia2_loss, [(s, t)])
    parts = _split_sum(ia2_loss, [(s[:, :4], t[:, :4]), (s[:, 4:5], t[:, 4:5]), (s[:, 5:], t[:, 5:])])
    assert parts == pytest.approx(whole, rel=1e-6)
    # selecting the real positions out of a padded tensor gives the unpadded loss
    padded_s = torch.cat([torch.randn(3, 2, 5), s], dim=1)
    padded_t = torch.cat([torch.randn(3, 2, 5), t], dim=1)
    keep = torch.arange(2, 11)
    assert torch.allclose(ia2_loss(padded_s[:, keep], padded_t[:, keep])[0], ia2_loss(s, t)[0])


def test_ia2_gradient_only_to_student():
    s = torch.randn(2, 3, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, requires_grad=True)
    ia2_loss(s, t, "teacher_norm")[0].backward()
    assert s.grad is not None and t.grad is None


def test_ia2_unknown_normalize():
    with pytest.raises(ValueError, match="teacher_norm"):
        ia2_loss(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), "layer")


# ----------------------------------------------------------------------------------------- combined

def test_combined_normalises_each_term_by_its_own_global_count():
    ia2, ce = (torch.tensor(6.0), 3), (torch.tensor(10.0), 5)
    value = combined(ia2, ce, 0.25, ia2_global_count=3, ce_global_count=5)
    assert float(value) == pytest.approx(0.75 * 2.0 + 0.25 * 2.0)
    # two micro-batches with the same global counts add up to the whole
    a = combined((torch.tensor(2.0), 1), (torch.tensor(4.0), 2), 0.25, 3, 5)
    b = combined((torch.tensor(4.0), 2), (torch.tensor(6.0), 3), 0.25, 3, 5)
    assert float(a + b) == pytest.approx(float(value))


def test_normalized_zero_count():
    assert float(normalized((torch.tensor(0.0), 0), 0)) == 0.0
