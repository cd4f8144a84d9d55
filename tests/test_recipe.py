"""The paper's recipe: the params that select the public scripts' behaviour, and their errors."""

from __future__ import annotations

import pytest
import yaml

from semires.errors import SemiresError
from stages.params import section
from stages.train_semi import AugmentParams, SemiParams


def _section(tmp_path, name, cls, value):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({name: value}))
    return section(path, name, cls)


# (section, class, value, the message docs/errors.md shows)
BAD = [
    (
        "semi",
        SemiParams,
        {"proposal_resize": "bilinear"},
        "params.yaml: semi.proposal_resize = 'bilinear': expected pil (as the ground truth) or torch "
        "(F.interpolate, as the official code)",
    ),
    (
        "semi",
        SemiParams,
        {"augment": {"blur_p": 2}},
        "params.yaml: semi.augment.blur_p = 2.0: expected a probability in [0, 1]",
    ),
    (
        "semi",
        SemiParams,
        {"augment": {"jitter_p": -0.5}},
        "params.yaml: semi.augment.jitter_p = -0.5: expected a probability in [0, 1]",
    ),
    (
        "semi",
        SemiParams,
        {"augment": {"blur_sigma": [2, 0.1]}},
        "params.yaml: semi.augment.blur_sigma = [2.0, 0.1]: expected [lo, hi] with 0 < lo <= hi <= 50 "
        "pixels, e.g. [1, 1] (the official radius)",
    ),
    (
        "semi",
        SemiParams,
        {"sup_weight": 0},
        "params.yaml: semi.sup_weight = 0.0: expected a positive factor, e.g. 1",
    ),
]


@pytest.mark.parametrize(("name", "cls", "value", "message"), BAD)
def test_bad_recipe_params_are_named(tmp_path, name, cls, value, message):
    with pytest.raises(SemiresError) as e:
        _section(tmp_path, name, cls, value)
    assert str(e.value) == message


def test_the_default_views_are_the_official_scripts():
    from semires.data import ColourJitter, Compose, GaussianBlur

    weak, strong = AugmentParams().views()
    assert isinstance(weak, Compose) and weak.transforms == [GaussianBlur(p=0.5, sigma=(1.0, 1.0))]  # no flip
    assert strong == ColourJitter(0.25, 0.25, 0.25, 0.25, p=0.5, random_order=True)
    weak, _ = AugmentParams(flip=False, blur_p=0.0).views()
    assert weak is None  # the resized image as it is
