"""fusedopt.transfer: freezing params and groups, L1 proximal steps, per-group and
layer-wise learning rates, and a small fine-tuning run."""

from __future__ import annotations

import numpy as np
import pytest

import fusedopt as fo
from fusedopt import transfer
from fusedopt.batched import BatchedSGD
from fusedopt.lbfgs import LBFGS
from fusedopt.newton import Newton


def _params(rng):
    return [rng.standard_normal((4, 3)), rng.standard_normal(3), rng.standard_normal((3, 2))]


def test_frozen_param_is_skipped_and_resumes(rng):
    ps = _params(rng)
    ref = [p.copy() for p in ps]
    opt = fo.SGD(ps, lr=0.1, momentum=0.9)
    ref_opt = fo.SGD(ref, lr=0.1, momentum=0.9)
    frozen_before = ps[1].copy()
    assert transfer.freeze(opt, ps[1]) is opt
    assert transfer.frozen_params(opt) == [1]
    for _ in range(3):
        grads = [rng.standard_normal(p.shape) for p in ps]
        opt.step(grads)
        ref_opt.step([grads[0], None, grads[2]])
    np.testing.assert_array_equal(ps[1], frozen_before)  # not a single bit changed
    assert 1 not in opt.state  # and no state was made for it
    for a, b in zip(ps, ref):
        np.testing.assert_array_equal(a, b)
    transfer.unfreeze(opt, ps[1])
    assert transfer.frozen_params(opt) == []
    grads = [rng.standard_normal(p.shape) for p in ps]
    opt.step(grads)
    ref_opt.step(grads)
    for a, b in zip(ps, ref):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("how", ["dict", "index", "list"])
def test_frozen_group(rng, how):
    ps = _params(rng)
    opt = fo.Adam([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.1}])
    target = {"dict": opt.param_groups[0], "index": 0, "list": [ps[0], ps[1]]}[how]
    before = [p.copy() for p in ps]
    transfer.freeze(opt, target)
    opt.step([np.ones_like(p) for p in ps])
    np.testing.assert_array_equal(ps[0], before[0])
    np.testing.assert_array_equal(ps[1], before[1])
    assert not np.array_equal(ps[2], before[2])
    assert sorted(opt.state) == [2]


def test_freeze_travels_in_the_state_dict(rng):
    ps = _params(rng)
    opt = transfer.freeze(fo.SGD([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1), 1)
    sd = opt.state_dict()
    assert sd["param_groups"][1]["frozen"] is True
    fresh = fo.SGD([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1)
    fresh.load_state_dict(sd)
    transfer.attach(fresh)
    before = ps[2].copy()
    fresh.step([np.ones_like(p) for p in ps])
    np.testing.assert_array_equal(ps[2], before)


def test_lbfgs_keeps_frozen_params_fixed(rng):
    w, b = np.zeros(3), np.full(2, 5.0)
    opt = transfer.freeze(LBFGS([w, b], line_search_fn="strong_wolfe"), b)

    def closure():
        loss = float(((w - 1.0) ** 2).sum() + ((b - 2.0) ** 2).sum())
        return loss, [2 * (w - 1.0), 2 * (b - 2.0)]

    opt.step(closure)
    np.testing.assert_allclose(w, 1.0)
    np.testing.assert_array_equal(b, 5.0)


def test_freeze_errors(rng):
    ps = _params(rng)
    opt = fo.SGD(ps, lr=0.1)
    with pytest.raises(ValueError, match="not one of the optimizer's params"):
        transfer.freeze(opt, ps[0].copy())
    transfer.freeze(opt, 0)
    with pytest.raises(ValueError, match="unfreeze the group"):
        transfer.unfreeze(opt, ps[0])
    with pytest.raises(TypeError, match="Newton"):
        transfer.freeze(Newton([np.zeros(2), np.zeros(1)]), 0)


def test_prox_l1():
    p = np.array([-3.0, -0.5, 0.0, 0.2, 1.0, 4.0])
    transfer.prox_l1_([p], 1.0)
    np.testing.assert_array_equal(p, [-2.0, -0.0, 0.0, 0.0, 0.0, 3.0])
    q = np.array(2.5, dtype=np.float32)  # 0-d, float32: in place, dtype kept
    transfer.prox_l1_([q], 0.5)
    assert q.dtype == np.float32 and float(q) == 2.0
    stacked = np.ones((3, 2))
    transfer.prox_l1_([stacked], np.array([0.0, 0.5, 2.0]).reshape(3, 1))
    np.testing.assert_array_equal(stacked, [[1, 1], [0.5, 0.5], [0, 0]])
    with pytest.raises(ValueError, match=">= 0"):
        transfer.prox_l1_([p], -1.0)


@pytest.mark.parametrize("cls,kw", [(fo.SGD, dict(lr=0.05, momentum=0.9)),
                                    (fo.Adam, dict(lr=0.05)),
                                    (fo.RMSprop, dict(lr=0.01))])
def test_l1_is_a_proximal_step_after_any_update(rng, cls, kw):
    ps = _params(rng)
    ref = [p.copy() for p in ps]
    opt = transfer.set_l1(cls([{"params": ps[:2], "l1": 0.0}, {"params": ps[2:]}], **kw), 0.5,
                          groups=[1])
    ref_opt = cls([{"params": ref[:2]}, {"params": ref[2:]}], **kw)
    for _ in range(5):
        grads = [rng.standard_normal(p.shape) for p in ps]
        opt.step(grads)
        ref_opt.step(grads)
        transfer.prox_l1_(ref[2:], ref_opt.param_groups[1]["lr"] * 0.5)
    for a, b in zip(ps, ref):
        np.testing.assert_array_equal(a, b)


def test_l1_makes_a_sparse_solution(rng):
    """Lasso by proximal gradient: the irrelevant weights become exactly zero."""
    x = rng.standard_normal((200, 10))
    w_true = np.zeros(10)
    w_true[:3] = [2.0, -1.5, 1.0]
    y = x @ w_true + 0.01 * rng.standard_normal(200)
    w = np.zeros(10)
    opt = transfer.set_l1(fo.SGD([w], lr=0.1), 0.05)
    for _ in range(300):
        opt.step([x.T @ (x @ w - y) / len(y)])
    assert (w[3:] == 0).all()
    np.testing.assert_allclose(w[:3], w_true[:3], atol=0.1)


def test_set_l1_refuses_where_it_does_not_apply():
    with pytest.raises(TypeError, match="LBFGS"):
        transfer.set_l1(LBFGS([np.zeros(2)]), 0.1)
    with pytest.raises(TypeError, match="batched"):
        transfer.set_l1(BatchedSGD([np.zeros((2, 3))]), 0.1)
    with pytest.raises(ValueError, match=">= 0"):
        transfer.set_l1(fo.SGD([np.zeros(2)]), -0.1)


def _named(rng):
    return [("embed.weight", rng.standard_normal((5, 4))),
            ("blocks.0.weight", rng.standard_normal((4, 4))), ("blocks.0.bias", np.zeros(4)),
            ("blocks.1.weight", rng.standard_normal((4, 4))), ("blocks.1.bias", np.zeros(4)),
            ("head.weight", rng.standard_normal((4, 2))), ("head.bias", np.zeros(2))]


def test_layerwise_lr_groups(rng):
    named = _named(rng)
    groups = transfer.layerwise_lr_groups(named, 1e-3, 0.5, weight_decay=0.1)
    assert [g["layer"] for g in groups] == ["embed", "blocks.0", "blocks.1", "head"]
    assert [g["lr"] for g in groups] == [1e-3 / 8, 1e-3 / 4, 1e-3 / 2, 1e-3]
    assert [len(g["params"]) for g in groups] == [1, 2, 2, 2]
    assert groups[1]["params"][0] is named[1][1] and groups[0]["weight_decay"] == 0.1
    opt = fo.AdamW(groups)
    opt.step([np.ones_like(p) for _, p in named])
    # a custom layer map: embeddings and the first block share a rate
    groups = transfer.layerwise_lr_groups(dict(named), 1.0, 0.1,
                                          layer_of=lambda n: "low" if n.startswith(
                                              ("embed", "blocks.0")) else n.split(".")[0])
    assert [(g["layer"], g["lr"]) for g in groups] == [("low", pytest.approx(0.01)),
                                                       ("blocks", pytest.approx(0.1)),
                                                       ("head", 1.0)]


def test_groups_by_name(rng):
    named = _named(rng)
    groups = transfer.groups_by_name(named, [("head.*", {"lr": 1e-2}),
                                             ("*.bias", {"weight_decay": 0.0})],
                                     lr=1e-3, weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [2, 2, 3]
    assert groups[0] == {"params": [named[5][1], named[6][1]], "lr": 1e-2, "weight_decay": 0.1}
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lr"] == 1e-3
    assert groups[2]["params"][0] is named[0][1]
    with pytest.raises(TypeError, match="pairs"):
        transfer.groups_by_name([np.zeros(2)], [])


def test_fine_tuning_a_new_head(rng):
    """Pretrain features + head on task A, then train only a new head on task B."""
    x = rng.standard_normal((256, 8))
    feat = 0.3 * rng.standard_normal((8, 16))
    head_a, head_b = np.zeros(16), np.zeros(16)
    y_a = np.tanh(x @ rng.standard_normal((8, 16))) @ rng.standard_normal(16)

    def loss_grads(head, y, train_feat):
        h = np.tanh(x @ feat)
        r = h @ head - y
        g_head = h.T @ r / len(y)
        g_feat = x.T @ (np.outer(r, head) * (1 - h**2)) / len(y) if train_feat else None
        return float((r**2).mean() / 2), g_feat, g_head

    opt = fo.Adam([{"params": [feat], "lr": 1e-2}, {"params": [head_a], "lr": 3e-2}])
    for _ in range(300):
        _, g_feat, g_head = loss_grads(head_a, y_a, True)
        opt.step([g_feat, g_head])
    pretrained = feat.copy()
    y_b = np.tanh(x @ pretrained) @ rng.standard_normal(16)  # task B uses the same features
    opt_b = fo.Adam([{"params": [feat], "lr": 1e-2}, {"params": [head_b], "lr": 5e-2}])
    transfer.freeze(opt_b, 0)
    first = loss_grads(head_b, y_b, False)[0]
    for _ in range(400):
        _, g_feat, g_head = loss_grads(head_b, y_b, True)
        opt_b.step([g_feat, g_head])  # the frozen group's gradient is dropped
    np.testing.assert_array_equal(feat, pretrained)
    assert loss_grads(head_b, y_b, False)[0] < 1e-2 * first
