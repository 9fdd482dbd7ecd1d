import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from steerbench.steering.iti import HeadReadout
from steerbench.steering.readouts import BUCKETS, CalibratedReadout, PrefixReadout, bucket_of

K, D = 3, 4


def tokens(n_answers=300, length=12, seed=0):
    """Answer tokens whose truth shows along dim 0 from token 3 on, along dim 1 before."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n_answers,), generator=g)
    pos = torch.arange(length).repeat(n_answers)
    lab = y.repeat_interleave(length)
    z = torch.randn(n_answers * length, K, D, generator=g, dtype=torch.float64)
    sign = lab.double() * 2 - 1
    late = pos >= 3
    z[late, :, 0] += 1.5 * sign[late, None]
    z[~late, :, 1] += 1.5 * sign[~late, None]
    return z, lab.numpy(), pos


def test_buckets_are_token_0_tokens_1_2_3_to_8_and_9_on():
    assert bucket_of(torch.arange(12)).tolist() == [0, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3]
    assert BUCKETS == (0, 1, 3, 9)
    with pytest.raises(ValueError, match="from 0"):
        bucket_of(-1)


def test_prefix_probes_read_what_each_position_carries():
    z, y, pos = tokens()
    readout = PrefixReadout.fit([[0, 0], [1, 1], [2, 2]], z, y, pos)
    zt, yt, post = tokens(seed=1)
    p = readout.p_true(zt, post)
    for at in (0, 2, 5, 11):
        m = post == at
        assert roc_auc_score(yt[m.numpy()], p[m].numpy()) > 0.9  # each bucket's own direction
    # one probe for every position (trained at the last token) reads only the late direction
    w = torch.zeros(K, D, dtype=torch.float64)
    w[:, 0] = 2.0
    last = HeadReadout([[0, 0], [1, 1], [2, 2]], weight=w,
                       bias=torch.zeros(K, dtype=torch.float64), mean=torch.zeros(K, D, dtype=torch.float64),
                       std=torch.ones(K, D, dtype=torch.float64))
    m = post == 0
    assert abs(roc_auc_score(yt[m.numpy()], last.p_true(zt[m]).numpy()) - 0.5) < 0.1


def test_calibration_keeps_each_positions_order_and_matches_its_rate():
    z, y, pos = tokens()
    base = HeadReadout([[0, 0], [1, 1], [2, 2]], weight=torch.full((K, D), 0.1, dtype=torch.float64),
                       bias=torch.full((K,), -2.0, dtype=torch.float64), mean=torch.zeros(K, D, dtype=torch.float64),
                       std=torch.ones(K, D, dtype=torch.float64))  # says "false" nearly always
    cal = CalibratedReadout.fit(base, z, y, pos)
    assert (cal.scale > 0).all()
    raw, new = base.p_true(z), cal.p_true(z, pos)
    for b in range(len(BUCKETS)):
        m = bucket_of(pos) == b
        assert abs(float(new[m].mean()) - float(y[m.numpy()].mean())) < 0.05  # calibrated to the bucket's rate
        order = torch.argsort(raw[m])
        assert (new[m][order].diff() >= -1e-12).all()  # monotone within the bucket
    assert float(raw.mean()) < 0.2


@pytest.mark.parametrize("bad, message", [("nan", "NaN"), ("short", "one entry per token"), ("one_label", "one label")])
def test_bad_training_tokens_are_refused(bad, message):
    z, y, pos = tokens(n_answers=20)
    if bad == "nan":
        z[3, 0, 0] = float("nan")
    elif bad == "short":
        y = y[:-1]
    else:
        y = np.ones_like(y)
    with pytest.raises(ValueError, match=message):
        PrefixReadout.fit([[0, 0], [1, 1], [2, 2]], z, y, pos)
