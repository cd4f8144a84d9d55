"""A loss that becomes NaN stops the run at once with the step named; the last good
checkpoint stays and nothing after the bad step is logged or saved. The non-finite value
comes from the data (a NaN image from some point on), the training itself runs for real."""

from __future__ import annotations

import math

import pytest
import torch

from semires.errors import CollectiveError
from semires.semi import SemiConfig, train_semi
from semires.train import ExpressionDataset, LoopConfig, NonFiniteWatch, load_checkpoint, train_supervised

from .test_semi import project, tiny, unlabeled  # noqa: F401  (test_semi's small project, by name)


@pytest.fixture(scope="module")
def semi(request):
    """test_semi's project: a synthetic set, its 25 % split and a proposals store."""
    return request.getfixturevalue("project")


class NaNAfter(ExpressionDataset):
    """An expression dataset whose images turn NaN from its ``after + 1``-th item on (the
    loader fetches a step's items in order, with no workers)."""

    def __init__(self, *args, after: int, **kw) -> None:
        super().__init__(*args, **kw)
        self.after, self.calls = after, 0

    def __getitem__(self, key):
        item = super().__getitem__(key)
        self.calls += 1
        image = item.image.float() / 255  # one dtype for every item of a batch
        return item._replace(image=image.fill_(float("nan")) if self.calls > self.after else image)


def _labeled(semi, spec, after: int) -> NaNAfter:
    root, anns, _, _ = semi
    return NaNAfter(
        anns.in_split("train"), root / "refer/images/synthref", spec.make_tokenizer(), image_size=64,
        max_tokens=20, after=after,
    )  # fmt: skip


def test_watch_names_the_first_bad_step_and_keeps_it_on_the_device():
    watch = NonFiniteWatch(torch.device("cpu"))
    for step, loss in enumerate([0.5, 0.4, math.nan, 0.3, math.inf], start=1):
        watch.update(torch.tensor(loss), step)
    assert watch.first_step() == 3
    host = NonFiniteWatch(torch.device("cpu"))
    host.update(0.2, 1)
    assert host.first_step() is None
    host.update(math.inf, 2)
    assert host.first_step() == 2


def test_supervised_run_stops_at_the_first_non_finite_loss(semi, tmp_path):
    """Checked before logging (every step here): nothing non-finite reaches the metrics."""
    _, anns, _, _ = semi
    spec, model = tiny(anns)
    data = _labeled(semi, spec, after=4)  # steps 1-2 (two samples each) are finite, step 3 is not
    logged: list[tuple[int, dict]] = []
    cfg = LoopConfig(steps=8, batch_size=2, lr=1e-3, log_every=1, checkpoint_every=2)
    scratch = tmp_path / "last.pt"
    with pytest.raises(CollectiveError) as e:
        train_supervised(
            model, spec, data, None, cfg, scratch=scratch, run_key="k",
            on_metrics=lambda step, m: logged.append((step, m)),
        )  # fmt: skip
    assert str(e.value) == (
        "the training loss became non-finite (NaN or infinite) at step 3; the run stopped without saving "
        f"a checkpoint after it, and the last good checkpoint {scratch} (step 2) stays: lower the learning "
        "rate or check the inputs, then rerun"
    )
    ckpt = load_checkpoint(scratch)
    assert ckpt.step == 2 and all(
        torch.isfinite(v).all() for v in ckpt.model.values() if v.is_floating_point()
    )
    assert all(math.isfinite(v) for _, m in logged for v in m.values()), logged
    assert [s for s, _ in logged] == [1, 2]


def test_teacher_student_run_stops_at_the_first_non_finite_loss(semi, tmp_path):
    """Checked before saving (no log point here): the checkpoint of step 4 is never written."""
    _, anns, _, _ = semi
    spec, model = tiny(anns)
    cfg = SemiConfig(
        steps=6,
        batch_size=2,
        unlabeled_batch_size=2,
        lr=1e-3,
        log_every=100,
        eval_every=0,
        checkpoint_every=2,
    )
    scratch = tmp_path / "last.pt"
    with pytest.raises(
        CollectiveError, match=r"non-finite \(NaN or infinite\) at step 3; .*\(step 2\) stays"
    ):
        train_semi(
            model, spec, _labeled(semi, spec, after=4), unlabeled(semi, spec), None, cfg,
            scratch=scratch, run_key="k",
        )  # fmt: skip
    ckpt = load_checkpoint(scratch)
    assert ckpt.step == 2
    for state in (ckpt.model, ckpt.teacher):
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
