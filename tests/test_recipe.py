"""The paper's recipe: the params that select the public scripts' behaviour, and their errors."""

from __future__ import annotations

import pytest
import yaml

from semires.errors import SemiresError
from stages.params import section
from stages.train_semi import SemiParams


def _section(tmp_path, name, cls, value):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({name: value}))
    return section(path, name, cls)


# (section, class, value, the message docs/errors.md shows)
BAD = [
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
