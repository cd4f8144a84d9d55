"""Stage commands on a full disk and in a read-only folder, for tests/test_bad_inputs.py.

Run inside a private user and mount namespace (``unshare -Urm python -m tests.machine_faults
CASES.json``), where mounting needs no privilege and ends with the process: a small tmpfs is
a real full disk, a read-only bind mount a real read-only folder (root ignores file modes,
not a read-only mount). Each case of CASES.json (a list) names its mounts, the command's
arguments and the folders whose files must stay as they were; the results (exit status,
stderr, whether those folders are unchanged) are written as JSON next to CASES.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path


def tree(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def mount(spec: dict) -> None:
    path = spec["path"]
    Path(path).mkdir(parents=True, exist_ok=True)
    if spec["kind"] == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={spec['size']}", "tmpfs", path], check=True)
        if spec.get("fill"):  # the disk full to the last byte
            try:
                with open(Path(path) / "filler", "wb", buffering=0) as f:
                    while True:
                        f.write(b"\0" * 512)
            except OSError:
                pass
    else:  # a read-only view of a folder that holds earlier outputs
        subprocess.run(["mount", "--bind", path, path], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", path], check=True)


def main() -> None:
    from typer.testing import CliRunner

    from stages.cli import app

    cases_path = Path(sys.argv[1])
    results = {}
    os.environ.pop("SEMIRES_NPROC", None)
    for case in json.loads(cases_path.read_text()):
        for spec in case["mounts"]:
            mount(spec)
        before = {d: tree(Path(d)) for d in case["unchanged"]}
        res = CliRunner().invoke(app, case["args"])
        results[case["name"]] = {
            "exit_code": res.exit_code,
            "stderr": res.stderr,
            "exception": None
            if res.exception is None or isinstance(res.exception, SystemExit)
            else repr(res.exception),
            "unchanged": all(tree(Path(d)) == before[d] for d in case["unchanged"]),
        }
    cases_path.with_suffix(".results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
