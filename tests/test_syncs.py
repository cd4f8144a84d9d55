"""Host syncs found on the CPU: the detector sees each kind and where it came from, and the
two training steps (teacher-student and supervised) have none."""

from __future__ import annotations

import copy

import pytest
import torch

from semires.blur import box_blur
from semires.data import ColourJitter
from semires.semi import SemiConfig, semi_step
from semires.syncs import HostSyncs, host_array, host_syncs, host_values
from semires.train import make_optimizer, poly_schedule, supervised_step

from .conftest import script_module

x = torch.arange(6.0)
mask = x > 2


@pytest.mark.parametrize(
    ("op", "fn"),
    [
        ("_local_scalar_dense", lambda: x.sum().item()),
        ("_local_scalar_dense", lambda: bool(x[0] > 0)),
        ("_local_scalar_dense", lambda: float(x[1])),
        ("_local_scalar_dense", lambda: int(x.argmax())),
        ("nonzero", lambda: x.nonzero()),
        ("masked_select", lambda: torch.masked_select(x, mask)),
        ("index", lambda: x[mask]),
        ("index_put_", lambda: x.clone().__setitem__(mask, 0.0)),
        ("_unique2", lambda: torch.unique(x)),
        ("unique_consecutive", lambda: torch.unique_consecutive(x)),
        ("bincount", lambda: torch.bincount(x.long())),
        ("repeat_interleave", lambda: torch.repeat_interleave(torch.tensor([1, 2]))),
        ("equal", lambda: torch.equal(x, x)),
        ("tolist", lambda: x.tolist()),
        ("cpu", lambda: x.cpu()),
        ("numpy", lambda: x.numpy()),
    ],
)
def test_each_kind_of_sync_is_found_once_with_its_line(op, fn):
    syncs = host_syncs(fn)
    assert [s.op for s in syncs.found] == [op]
    assert syncs.found[0].where.startswith("test_syncs.py:")


def test_work_that_stays_on_the_device_is_no_sync():
    idx = torch.tensor([0, 2])

    def stays():
        y = torch.where(mask, x, 0.0) + x[idx].sum()  # a long index is a gather, no read-back
        y.masked_fill_(mask, 1.0)
        z = torch.zeros(6).index_copy_(0, idx, x[:2])
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        return (mask.any(), x.to("cpu"), z.max(), x.reshape(2, 3).shape[0])

    assert len(host_syncs(stays)) == 0


def test_the_summary_counts_each_place_once():
    def twice():
        for _ in range(2):
            torch.allclose(x, x)  # an answer on the host: the device's values read back

    syncs = host_syncs(twice)
    assert len(syncs) == 2
    assert syncs.summary() == f"allclose at test_syncs.py:{twice.__code__.co_firstlineno + 2} in twice (x2)"
    assert host_syncs(lambda: None).summary() == "none"


@pytest.fixture(scope="module")
def step_parts():
    with script_module("gpu_check") as gpu_check:
        sizes = gpu_check.Sizes.tiny()
        torch.manual_seed(0)
        spec, student = gpu_check.build_lavt("tiny", torch.device("cpu"))
        lab, unl = gpu_check.step_inputs(spec, sizes, torch.device("cpu"))
    assert not bool(lab.attention_mask.all())  # pads in the batch: BERT's mask is no shortcut
    return student, lab, unl


def _step(student, lab, unl, plant=None):
    student = copy.deepcopy(student).train()
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    cfg = SemiConfig(steps=10, batch_size=2, unlabeled_batch_size=2)
    opt = make_optimizer(student, lr=1e-3, weight_decay=0.01)
    sched = poly_schedule(opt, total_steps=10, power=0.9)
    semi_step(student, teacher, lab, unl, opt, sched, cfg=cfg, device=torch.device("cpu"))  # warm
    return host_syncs(
        lambda: semi_step(student, teacher, lab, unl, opt, sched, cfg=cfg, device=torch.device("cpu"))
    )


def test_the_teacher_student_step_has_no_host_sync(step_parts):
    _, _, unl = step_parts
    assert bool(unl.blur.any()) and bool(unl.jitter[:, 0].any())  # both views' host numbers are read
    syncs = _step(*step_parts)
    assert len(syncs) == 0, syncs.summary()


def test_numbers_that_live_on_the_host_are_read_without_a_sync_and_only_from_the_host():
    codes = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    with HostSyncs() as syncs:
        assert host_values(codes) == [[1.0, 2.0], [3.0, 4.0]]
        assert host_array(codes).shape == (2, 2)
        codes.tolist()  # the same read without saying the tensor is a host one: counted
    assert [s.op for s in syncs.found] == ["tolist"]
    on_device = torch.empty(2, device="meta")
    for read in (host_values, host_array):
        with pytest.raises(ValueError, match="lives on the host; this one is on meta"):
            read(on_device)


def test_the_device_side_view_operations_have_no_host_sync():
    """What unlabeled_to_device runs on a GPU: the blur in torch (the CPU uses PIL) and the
    colour jitter from host codes."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    jitter = ColourJitter(0.25, 0.25, 0.25, 0.25, random_order=True, p=1.0)
    codes = torch.stack([jitter.code(gen) for _ in range(2)])
    with HostSyncs() as syncs:
        box_blur(pixels, 1.5)
        ColourJitter.apply_codes(pixels.float() / 255, codes)
    assert len(syncs) == 0, syncs.summary()


def test_a_planted_item_in_the_step_is_found(step_parts, monkeypatch):
    import semires.semi

    plain = semires.semi.ema_update

    def with_item(teacher, student, rate):
        plain(teacher, student, rate)
        next(teacher.parameters()).sum().item()

    monkeypatch.setattr(semires.semi, "ema_update", with_item)
    syncs = _step(*step_parts)
    assert [s.op for s in syncs.found] == ["_local_scalar_dense"]
    assert syncs.found[0].where.startswith("test_syncs.py:") and syncs.found[0].where.endswith("in with_item")


def test_a_sync_in_a_library_also_names_the_project_line_that_led_there(step_parts):
    student, lab, _ = step_parts
    text = copy.deepcopy(student.text)
    forward = type(text.bert).forward

    def with_2d_mask(input_ids, attention_mask):  # transformers' own preparation of a B x T mask
        return forward(text.bert, input_ids=input_ids, attention_mask=attention_mask)

    syncs = host_syncs(lambda: with_2d_mask(lab.input_ids, lab.attention_mask))
    assert len(syncs) == 1
    found = syncs.found[0]
    assert found.where.startswith("masking_utils.py:") and found.via.startswith("test_syncs.py:")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_supervised_step_has_no_host_sync_and_returns_the_loss_on_the_device(step_parts, dropout):
    student, lab, _ = step_parts
    model = copy.deepcopy(student).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.01)
    sched = poly_schedule(opt, total_steps=10, power=0.9)
    kw = {"class_weights": (0.9, 1.1), "device": torch.device("cpu")}
    with HostSyncs() as syncs:
        loss = supervised_step(model, lab, opt, sched, **kw)
    assert len(syncs) == 0, syncs.summary()
    assert isinstance(loss, torch.Tensor) and loss.shape == () and not loss.requires_grad
