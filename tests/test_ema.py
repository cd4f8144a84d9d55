import pytest
import torch
from torch import nn

from semires.ema import ema_update


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_ema_arithmetic():
    teacher, student = _net(0), _net(1)
    student[1].num_batches_tracked += 7
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.9996)
    for k, v in teacher.state_dict().items():
        s = student.state_dict()[k]
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9996 * before_t[k] + 0.0004 * s, rtol=0, atol=1e-7)
        else:
            assert torch.equal(v, s)


def test_rate_one_keeps_teacher_rate_zero_copies_student():
    teacher, student = _net(0), _net(1)
    ref = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 1.0)
    for k, v in teacher.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, ref[k])
    ema_update(teacher, student, 0.0)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, student.state_dict()[k])


def test_repeated_updates_converge_geometrically():
    teacher, student = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        teacher.weight.fill_(0.0)
        student.weight.fill_(1.0)
    for _ in range(10):
        ema_update(teacher, student, 0.5)
    assert teacher.weight.item() == pytest.approx(1 - 0.5**10)


def test_mismatched_modules():
    with pytest.raises(ValueError, match="differ"):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.9)
    with pytest.raises(ValueError, match="weight"):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 3), 0.9)
    with pytest.raises(ValueError, match="rate"):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 2), 1.5)
