"""Stage ``split``: labeled / unlabeled train images for each label fraction."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

from semires import annotations
from semires.atomic import atomic_path, write_json
from semires.errors import SemiresError
from semires.split import check_nested, fraction_name, random_split, split_from_file
from stages.common import DEFAULT_PARAMS, AnnsOption, ParamsOption, log, stage_command
from stages.params import check, section


@dataclasses.dataclass(frozen=True)
class SplitParams:
    seed: int = 0
    fractions: list[float] = dataclasses.field(default_factory=lambda: [5.0, 10.0])
    files: dict[float, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check(len(self.fractions) > 0, "split.fractions", self.fractions, "expected at least one percentage")
        for i, f in enumerate(self.fractions):
            check(0 < f <= 100, f"split.fractions[{i}]", f, "expected a percentage in (0, 100], e.g. 1 or 10")
        check(
            len(set(self.fractions)) == len(self.fractions),
            "split.fractions",
            self.fractions,
            "each percentage once",
        )
        for f in self.files:
            check(
                f in self.fractions,
                f"split.files.{f:g}",
                self.files[f],
                "the key must be one of split.fractions",
            )


def _read_split_file(path: Path) -> object:
    if not path.is_file():
        raise SemiresError(
            f"{path}: split file not found (split.files in params.yaml); fix the path or "
            "remove the entry to draw that fraction at random"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SemiresError(f"{path}: not valid JSON ({e}); expected a SemiRES/SimREC split file") from e


@stage_command("split")
def split(
    anns_path: AnnsOption = Path("data/anns.json"),
    out: Annotated[Path, typer.Option(help="Folder to write one <percent>.json per fraction to.")] = Path(
        "data/split"
    ),
    summary_path: Annotated[
        Path, typer.Option("--summary", help="Counts per fraction (a DVC metric).")
    ] = Path("data/metrics/split.json"),
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Draw the labeled train images of every fraction in split.fractions (by image, seeded)."""
    p = section(params, "split", SplitParams)
    anns = annotations.load(anns_path)
    train = anns.image_ids("train")
    results = []
    for pct in p.fractions:
        if pct in p.files:
            path = Path(p.files[pct])
            results.append(split_from_file(_read_split_file(path), anns, pct, name=str(path)))
        else:
            results.append(random_split(train, pct, p.seed))
    check_nested(results)
    summary = {}
    with atomic_path(out, directory=True) as tmp:
        for s in results:
            doc = s.to_json(anns)
            write_json(tmp / f"{fraction_name(s.percent)}.json", doc, indent=None)
            summary[fraction_name(s.percent)] = doc["counts"]
            lab, unl = doc["counts"]["labeled"], doc["counts"]["unlabeled"]
            log(
                "split",
                f"{s.percent:g}% ({s.source}): labeled {lab['images']} images / {lab['refs']} refs / "
                f"{lab['sentences']} sentences; unlabeled {unl['images']} images / {unl['refs']} refs",
            )
    write_json(summary_path, summary)
