"""Linear probes on synthetic activations (no language model is loaded here)."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from steerbench.probes import ProbeGrid, fit_probes, group_split, roc_auc


def planted(n=600, sites=(4, 3), d=16, site=(2, 1), noise=0.1, seed=0):
    """Gaussian activations; labels are the sign of the projection on a planted direction at one site."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, *sites, d, generator=g)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    labels = (acts[(slice(None), *site)] @ u + noise * torch.randn(n, generator=g) > 0).long()
    return acts, labels, u


@pytest.fixture(scope="module")
def planted_probes():
    acts, labels, u = planted()
    return fit_probes(acts, labels), acts, labels, u


def test_planted_direction_is_recovered(planted_probes):
    p, _, _, u = planted_probes
    assert p.sites_shape == (4, 3)
    assert p.val_acc.shape == p.train_acc.shape == p.val_auc.shape == (4, 3)
    assert p.directions.shape == p.mass_mean.shape == (4, 3, 16)
    assert p.val_acc[2, 1] > 0.9
    assert p.val_auc[2, 1] > 0.95
    assert abs(float(p.directions[2, 1] @ u)) > 0.9
    assert float(p.directions[2, 1] @ u) > 0  # points towards label 1
    assert float(p.mass_mean[2, 1] @ u) > 0.9
    torch.testing.assert_close(p.directions.norm(dim=-1), torch.ones(4, 3))
    noise = torch.ones(4, 3, dtype=torch.bool)
    noise[2, 1] = False
    assert (p.val_acc[noise] < 0.65).all()


def test_shuffled_labels_stay_at_chance():
    acts, labels, _ = planted()
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    p = fit_probes(acts, shuffled)
    assert abs(float(p.val_acc.mean()) - 0.5) < 0.08


def test_torch_agrees_with_sklearn():
    # every site carries some signal, with label noise: accurate but far from perfect probes
    g = torch.Generator().manual_seed(3)
    n, sites, d = 800, (3, 4), 12
    y = torch.randint(0, 2, (n,), generator=g)
    acts = torch.randn(n, *sites, d, generator=g)
    shift = torch.linspace(0.1, 0.35, 12).reshape(sites)[..., None] * torch.randn(*sites, d, generator=g)
    acts = acts + (2 * y - 1)[:, None, None, None] * shift
    groups = torch.arange(n) // 2  # pairs share a group
    pt = fit_probes(acts, y, groups=groups, backend="torch")
    ps = fit_probes(acts, y, groups=groups, backend="sklearn")
    assert (pt.train_idx == ps.train_idx).all() and (pt.val_idx == ps.val_idx).all()
    assert 0.55 < float(pt.val_acc.min()) and float(pt.val_acc.max()) < 0.97
    assert (pt.val_acc - ps.val_acc).abs().max() <= 0.01 + 1e-9
    assert (pt.val_auc - ps.val_auc).abs().max() < 0.01
    assert float((pt.directions * ps.directions).sum(-1).min()) > 0.999
    # solved tightly, both reach the same optimum
    pt = fit_probes(acts, y, groups=groups, backend="torch", tol=1e-7)
    ps = fit_probes(acts, y, groups=groups, backend="sklearn", tol=1e-7)
    torch.testing.assert_close(pt.weight, ps.weight, rtol=0, atol=1e-4)
    torch.testing.assert_close(pt.val_acc, ps.val_acc)


def test_group_split():
    groups = [f"q{i // 2}" for i in range(100)]  # 50 questions, two rows each
    tr, va = group_split(groups, val_fraction=0.2, seed=7)
    assert len(tr) + len(va) == 100 and len(np.intersect1d(tr, va)) == 0
    assert not {groups[i] for i in tr} & {groups[i] for i in va}
    assert len({groups[i] for i in va}) == 10
    tr2, va2 = group_split(groups, val_fraction=0.2, seed=7)
    assert (tr == tr2).all() and (va == va2).all()
    _, va3 = group_split(groups, val_fraction=0.2, seed=8)
    assert set(va3) != set(va)
    # a tensor of ids splits like the same ids in a list
    _, va4 = group_split(torch.arange(100) // 2, seed=7)
    _, va5 = group_split([i // 2 for i in range(100)], seed=7)
    assert (va4 == va5).all()
    with pytest.raises(ValueError, match="at least 2 distinct groups"):
        group_split([3, 3, 3])
    with pytest.raises(ValueError, match="val_fraction"):
        group_split([1, 2, 3], val_fraction=1.0)


def _bad(case):
    acts, labels = torch.randn(20, 3, 4), torch.arange(20) % 2
    if case == "nan":
        acts[5, 1, 2] = float("nan")
    elif case == "inf":
        acts[0, 0, 0] = float("inf")
    elif case == "one class":
        labels = torch.ones(20)
    elif case == "one class in train":
        labels = (torch.arange(20) < 10).long()
        return acts, labels, {"groups": labels}  # two groups: one is all 1s, the other all 0s
    elif case == "labels length":
        labels = labels[:-1]
    elif case == "groups length":
        return acts, labels, {"groups": list(range(19))}
    elif case == "non-binary":
        labels = torch.arange(20) % 3
    elif case == "empty":
        acts, labels = torch.randn(0, 3, 4), torch.zeros(0)
    elif case == "1-D acts":
        acts = torch.randn(20)
    return acts, labels, {}


@pytest.mark.parametrize(
    "case, message",
    [
        ("nan", "NaN or inf"),
        ("inf", "NaN or inf"),
        ("one class", "both classes"),
        ("one class in train", "training split has only label"),
        ("labels length", "19 labels for 20 examples"),
        ("groups length", "19 group ids for 20 examples"),
        ("non-binary", "binary"),
        ("empty", "empty"),
        ("1-D acts", "at least 2 dims"),
    ],
)
def test_bad_inputs(case, message):
    acts, labels, kw = _bad(case)
    with pytest.raises(ValueError, match=message):
        fit_probes(acts, labels, **kw)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        fit_probes(torch.randn(10, 4), torch.arange(10) % 2, backend="jax")


def test_predict_proba_reproduces_accuracy(planted_probes):
    p, acts, labels, _ = planted_probes
    prob = p.predict_proba(acts)
    assert prob.shape == (600, 4, 3)
    assert ((prob >= 0) & (prob <= 1)).all()
    y = labels.double()[:, None, None]
    val = ((prob[p.val_idx] > 0.5).double() == y[p.val_idx]).double().mean(0)
    train = ((prob[p.train_idx] > 0.5).double() == y[p.train_idx]).double().mean(0)
    torch.testing.assert_close(val, p.val_acc)
    torch.testing.assert_close(train, p.train_acc)
    with pytest.raises(ValueError, match="shape"):
        p.predict_proba(acts[:, :2])


def test_auc_is_exact_with_ties():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (50,), generator=g).double()
    scores = torch.randint(0, 6, (4, 50), generator=g).double()  # many ties
    ours = roc_auc(scores, y)
    ref = [roc_auc_score(y.numpy(), s.numpy()) for s in scores]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-12)
    assert torch.isnan(roc_auc(scores, torch.ones(50, dtype=torch.float64))).all()


def _grid(val_acc, val_auc):
    shape = tuple(val_acc.shape)
    z = torch.zeros(*shape, 2)
    return ProbeGrid(shape, torch.zeros(shape), val_acc, val_auc, z, z, z.double(), torch.zeros(shape).double(),
                     z.double(), z.double() + 1, np.arange(3), np.arange(3, 4), "torch")


def test_top_orders_by_accuracy_then_auc():
    acc = torch.tensor([[0.7, 0.9, 0.6], [0.9, 0.5, 0.7]])
    auc = torch.tensor([[0.8, 0.91, 0.7], [0.95, 0.5, float("nan")]])
    top = _grid(acc, auc).top(4)
    assert [site for site, _ in top] == [(1, 0), (0, 1), (0, 0), (1, 2)]
    assert [a for _, a in top] == pytest.approx([0.9, 0.9, 0.7, 0.7])
    assert len(_grid(acc, auc).top(100)) == 6


def test_top_on_fitted_probes(planted_probes):
    p = planted_probes[0]
    top = p.top(3)
    assert top[0][0] == (2, 1)
    assert [a for _, a in top] == sorted((a for _, a in top), reverse=True)


def test_to_frame_columns(planted_probes):
    df = planted_probes[0].to_frame()
    assert list(df.columns) == ["layer", "head", "train_acc", "val_acc", "val_auc"]
    assert len(df) == 12
    row = df[(df["layer"] == 2) & (df["head"] == 1)].iloc[0]
    assert row.val_acc == pytest.approx(float(planted_probes[0].val_acc[2, 1]))

    acts, labels, _ = planted(n=200, sites=(5,), d=8, site=(3,))
    p = fit_probes(acts, labels)
    assert list(p.to_frame().columns) == ["layer", "train_acc", "val_acc", "val_auc"]
    assert p.top(1)[0][0] == (3,)

    acts, labels, _ = planted(n=200, sites=(2, 2, 2), d=4, site=(1, 0, 1))
    cols = list(fit_probes(acts, labels).to_frame().columns)
    assert cols[:3] == ["site0", "site1", "site2"]


def test_no_site_dims():
    acts, labels, _ = planted(n=300, sites=(), d=8, site=())
    p = fit_probes(acts, labels)
    assert p.sites_shape == () and p.val_acc.shape == () and p.directions.shape == (8,)
    assert p.predict_proba(acts).shape == (300,)
    assert p.top(5) == [((), float(p.val_acc))]
    assert len(p.to_frame()) == 1
