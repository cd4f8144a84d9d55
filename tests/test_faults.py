"""Faults with a real signal: `semires burn-in` and `semires train-semi` under the real
launcher with two processes (SEMIRES_NPROC=2: torchrun, gloo on CPU), their whole process
group killed with SIGKILL mid-run (a terminal's Ctrl-C or a job scheduler kills a group):
no process of the run survives, a second run started meanwhile is refused, and the rerun
resumes and ends with the very weights of an unbroken run; a killed run leaves no output
that looks finished; a scratch checkpoint of another configuration is never mixed in.

Each killed, resumed and reference run is its own `python -m stages.cli` process tree with
one thread per process, so the weights can be compared bit for bit. The inputs (a
16-image synthetic set, its proposals, a short burn-in) are made in-process through the same
commands.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from semires import annotations
from semires.atomic import write_json
from semires.distributed import LAUNCHER_ENV
from semires.refer import read_refer
from semires.split import random_split
from semires.synth import SynthOptions, write_dataset
from stages.cli import app

from .conftest import REPO

CHECKPOINT_EVERY = 4
STEPS = 40  # long enough that a kill a little after the first checkpoint lands mid-run


# --- a small project, shared with test_bad_inputs ---------------------------------------------


def base_params(root: Path) -> dict:
    return {
        "dataset": {"image_dir": str(root / "refer" / "images" / "synthref")},
        "split": {"fractions": [25, 50]},
        "proposals": {"shard_images": 4},
        "model": {"preset": "tiny", "image_size": 64},
        "burn_in": {
            "steps": 4, "batch_size": 2, "lr": 1e-3, "log_every": 2, "eval_every": 0, "checkpoint_every": 2,
        },
        "semi": {
            "fractions": [50], "methods": ["cpi_pwa"], "steps": 4, "batch_size": 2, "unlabeled_batch_size": 2,
            "log_every": 2, "eval_every": 0, "checkpoint_every": 2, "quality_samples": 8,
        },
        "evaluate": {"batch_size": 8},
    }  # fmt: skip


def write_params(path: Path, params: dict, **changes) -> Path:
    """``params`` with ``changes`` ({"semi__lr": 0.1}: section semi, key lr) as a YAML file."""
    doc = json.loads(json.dumps(params))
    for name, value in changes.items():
        sect, key = name.split("__")
        doc.setdefault(sect, {})[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def invoke(args: list[str]):
    """A stage command in this process: one process (SEMIRES_NPROC unset), one thread (the
    cores are shared; several threads of a tiny model only wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("SEMIRES_NPROC", raising=False)
            return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def must_succeed(args: list[str]) -> str:
    res = invoke(args)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.output
    return res.output


def make_project(root: Path) -> Path:
    """A 16-image synthetic set, its annotations, 25 % and 50 % splits, params.yaml, the
    proposals store and a 4-step 50 % burn-in checkpoint, all under ``root``."""
    write_dataset(root / "refer", SynthOptions(num_images=16, seed=7))
    anns = read_refer(root / "refer", "synthref", "unc")
    annotations.save(root / "anns.json", anns)
    annotations.save_images(root / "train_images.json", anns, "train")
    for pct in (25, 50):
        write_json(
            root / "split" / f"{pct}.json", random_split(anns.image_ids("train"), pct, 0).to_json(anns)
        )
    params = write_params(root / "params.yaml", base_params(root))
    must_succeed(propose_args(root, root / "proposals.zarr", root / "scratch" / "propose", params))
    must_succeed(burn_in_args(root, root / "burn_in" / "50", root / "scratch" / "burn_in", params))
    return root


def propose_args(root: Path, out: Path, scratch: Path, params: Path) -> list:
    return ["propose", "--images", root / "train_images.json", "--out", out, "--scratch", scratch,
            "--params", params]  # fmt: skip


def burn_in_args(root: Path, out_dir: Path, scratch: Path, params: Path, split: Path | None = None) -> list:
    return ["burn-in", "--split", split or root / "split" / "50.json", "--anns", root / "anns.json",
            "--out", out_dir / "model.pt", "--live", out_dir / "dvclive", "--scratch", scratch,
            "--params", params, "--resume"]  # fmt: skip


def train_semi_args(
    root: Path, out_dir: Path, scratch: Path, params: Path, *, method: str = "cpi_pwa",
    split: Path | None = None, burn_in: Path | None = None, proposals: Path | None = None,
) -> list:  # fmt: skip
    return ["train-semi", "--method", method, "--split", split or root / "split" / "50.json",
            "--burn-in", burn_in or root / "burn_in" / "50" / "model.pt",
            "--proposals", proposals or root / "proposals.zarr", "--anns", root / "anns.json",
            "--out", out_dir / "model.pt", "--live", out_dir / "dvclive",
            "--quality", out_dir / "pseudo_labels.json", "--scratch", scratch,
            "--params", params, "--resume"]  # fmt: skip


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("faults"))


# --- processes -------------------------------------------------------------------------------


NPROC = 2  # processes per run of the killed stages: the real launcher and torchrun


def start(args: list, log: Path, nproc: int = NPROC, launcher: bool = True) -> subprocess.Popen:
    """``semires <args>`` as its own process group (this checkout, one thread per process,
    ``nproc`` processes), output to ``log``. Without ``launcher`` the command's torchrun is
    started directly, as the launcher would start it (the same workers, one process and a
    few seconds of imports fewer: for runs whose launcher is not under test)."""
    env = {k: v for k, v in os.environ.items() if k != "SEMIRES_NPROC"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", SEMIRES_NPROC=str(nproc))
    cmd = [sys.executable, "-m", "stages.cli", *map(str, args)]
    if not launcher and nproc > 1:
        env[LAUNCHER_ENV] = str(os.getpid())
        cmd = [
            sys.executable,
            "-m",
            "semires.distributed",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *cmd[1:],
        ]
    with log.open("w") as f:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a command started from a shell
        )


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_tree(pid: int) -> dict[int, str]:
    """Every descendant of ``pid`` (torchrun starts its workers in sessions of their own, but
    they stay its children), as ``{pid: start time}``."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None:
            children.setdefault(int(st[1]), []).append(int(d.name))
    tree, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if (st := _stat(child)) is not None:
                tree[child] = st[19]
                todo.append(child)
    return tree


def survivors(tree: dict[int, str], within: float = 5.0) -> list[int]:
    """The processes of ``tree`` still running after ``within`` seconds (a zombie has ended;
    a pid with another start time is another process)."""
    deadline = time.monotonic() + within
    while True:
        left = [p for p, t in tree.items() if (st := _stat(p)) is not None and st[0] != "Z" and st[19] == t]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen) -> dict[int, str]:
    """SIGKILL the process group of ``proc`` (as a scheduler does); returns the process tree
    it had, to check that nothing of it survives."""
    tree = {proc.pid: _stat(proc.pid)[19], **process_tree(proc.pid)}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return tree


def refused_while_running(args: list, scratch: Path, stage: str) -> None:
    """The same command, started while a run holds ``scratch``: one line, exit 2, no work."""
    res = invoke(args)
    assert res.exit_code == 2, res.output
    (line,) = res.stderr.splitlines()
    assert re.fullmatch(
        rf"semires {stage}: error: {re.escape(str(scratch))}: another `semires {stage}` run \(pid \d+ on "
        rf"\S+\) is using this scratch folder; wait for it to end or stop it \(or give this run its own "
        r"--scratch\)",
        line,
    ), line


def finish(proc: subprocess.Popen, log: Path) -> str:
    proc.wait(timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text
    return text


def kill_mid_run(proc: subprocess.Popen, scratch: Path, log: Path, args: list, stage: str) -> str:
    """SIGKILL ``proc``'s process group at a random moment after its 2nd to 4th scratch
    checkpoint; check that a second run is refused while it runs and that none of its
    processes survives the kill.

    Each checkpoint is a new file renamed onto ``last.pt``, so the kill point counts
    checkpoints rather than seconds and lands mid-run on a fast machine or a slow one. A file
    is told apart by inode and modification time: a freed inode is soon reused.
    """

    def identity(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns

    deadline = time.monotonic() + 180

    def alive() -> None:
        assert proc.poll() is None, f"ended before the kill:\n{log.read_text()}"
        assert time.monotonic() < deadline, "too slow: no checkpoints after 180 s"

    while not (found := list(scratch.glob("*/last.pt"))):
        alive()
        time.sleep(0.005)
    (last,) = found
    seen, stamps = {identity(last)}, [time.monotonic()]
    wanted = random.randint(2, 4)
    while len(seen) < wanted:
        alive()
        ino = identity(last)
        if ino not in seen:
            seen.add(ino)
            stamps.append(time.monotonic())
        time.sleep(0.002)
    delay = random.uniform(0.0, 0.5 * min(b - a for a, b in itertools.pairwise(stamps)))
    time.sleep(delay)
    alive()
    refused_while_running(args, scratch, stage)
    tree = kill_group(proc)
    assert len(tree) >= 4, f"launcher, torchrun and {NPROC} workers expected: {tree}"
    assert not survivors(tree), f"processes of the killed run still running: {survivors(tree, 0)}"
    return f"killed {delay:.3f} s after checkpoint {wanted}"


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(got: dict, want: dict, what: str) -> None:
    assert list(got) == list(want), what
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ from the unbroken run, e.g. {differ[:3]}"


# --- one killed run per stage, shared by the tests below --------------------------------------


@dataclass
class Killed:
    stage: str
    root: Path
    params: Path
    scratch: Path  # the killed run's scratch root
    out_dir: Path  # where the killed run was writing
    previous: bytes  # the complete model.pt that was there before the killed run
    reference: Path  # the unbroken run's model.pt
    when: str  # where in the run the kill landed

    def args(self, out_dir: Path, scratch: Path, params: Path | None = None, **kw) -> list:
        make = burn_in_args if self.stage == "burn-in" else train_semi_args
        return make(self.root, out_dir, scratch, params or self.params, **kw)

    def copy_scratch(self, dest: Path) -> Path:
        """The killed run's partial work (not its lock file: a lock belongs to a process)."""
        shutil.copytree(self.scratch, dest, ignore=shutil.ignore_patterns(".lock"))
        return dest


def _killed(stage: str, project: Path, tmp: Path) -> Killed:
    section = "burn_in" if stage == "burn-in" else "semi"
    params = write_params(
        tmp / "params.yaml",
        base_params(project),
        **{
            f"{section}__steps": STEPS,
            f"{section}__checkpoint_every": CHECKPOINT_EVERY,
            f"{section}__log_every": 1,  # rows past the checkpoint before the kill
        },
    )
    run = Killed(
        stage, project, params, tmp / "scratch", tmp / "killed", b"", tmp / "reference" / "model.pt", 0
    )
    make = burn_in_args if stage == "burn-in" else train_semi_args
    # A complete output from before: the killed run must leave it as it was.
    run.out_dir.mkdir()
    run.previous = (project / "burn_in" / "50" / "model.pt").read_bytes()
    (run.out_dir / "model.pt").write_bytes(run.previous)
    reference = start(
        make(project, run.reference.parent, tmp / "reference-scratch", params),
        tmp / "reference.log",
        launcher=False,
    )
    killed_args = make(project, run.out_dir, run.scratch, params)
    killed = start(killed_args, tmp / "killed.log")
    try:
        run.when = kill_mid_run(killed, run.scratch, tmp / "killed.log", killed_args, stage)
        finish(reference, tmp / "reference.log")
    finally:
        for p in (reference, killed):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return run


@pytest.fixture(scope="module")
def killed_burn_in(project, tmp_path_factory) -> Killed:
    return _killed("burn-in", project, tmp_path_factory.mktemp("killed-burn-in"))


@pytest.fixture(scope="module")
def killed_train_semi(project, tmp_path_factory) -> Killed:
    return _killed("train-semi", project, tmp_path_factory.mktemp("killed-train-semi"))


@pytest.fixture(params=["burn-in", "train-semi"])
def killed(request) -> Killed:
    return request.getfixturevalue("killed_" + request.param.replace("-", "_"))


# --- the tests ---------------------------------------------------------------------------------


def test_killed_run_leaves_no_partial_output(killed):
    assert (killed.out_dir / "model.pt").read_bytes() == killed.previous, "the earlier output was touched"
    others = [p.name for p in killed.out_dir.iterdir() if p.name != "model.pt"]
    assert all(n.startswith(".") and n.endswith(".tmp") for n in others), others  # the live folder: not yet
    checkpoints = list(killed.scratch.glob("*/last.pt"))
    assert len(checkpoints) == 1
    assert torch.load(checkpoints[0], weights_only=True)["step"] % CHECKPOINT_EVERY == 0


def test_resumed_run_ends_with_the_weights_of_an_unbroken_run(killed, tmp_path):
    scratch = killed.copy_scratch(tmp_path / "scratch")
    out_dir = tmp_path / "out"
    rerun = start(killed.args(out_dir, scratch), tmp_path / "resume.log", launcher=False)
    log = finish(rerun, tmp_path / "resume.log")
    resumed = re.search(r"\(resumed at step (\d+)\)", log)
    assert resumed, log
    step = int(resumed.group(1))
    assert 0 < step < STEPS and step % CHECKPOINT_EVERY == 0, f"{step} ({killed.when})"
    got, want = weights(out_dir / "model.pt"), weights(killed.reference)
    assert got["step"] == want["step"] == STEPS
    assert_same_tensors(got["model"], want["model"], f"{killed.stage} model, resumed at step {step}")
    if killed.stage == "train-semi":
        assert_same_tensors(got["teacher"], want["teacher"], f"teacher, resumed at step {step}")
    assert (out_dir / "dvclive" / "metrics.json").is_file()
    for tsv in (out_dir / "dvclive" / "plots" / "metrics").rglob("*.tsv"):
        steps = [int(float(r.split("\t")[0])) for r in tsv.read_text().splitlines()[1:]]
        assert steps == sorted(set(steps)), (
            f"{tsv.name}: steps logged twice after resuming at {step}: {steps}"
        )
    assert not any(scratch.iterdir()), "a finished run removes its scratch"


def _other_burn_in(project: Path, tmp: Path) -> Path:
    """A burn-in checkpoint of another model configuration (96 px input: another fingerprint)."""
    params = write_params(tmp / "params-96.yaml", base_params(project), model__image_size=96)
    must_succeed(burn_in_args(project, tmp / "burn_in_96", tmp / "scratch-96", params))
    return tmp / "burn_in_96" / "model.pt"


@pytest.mark.parametrize(
    ("stage", "change"),
    [("burn-in", "learning rate"), ("train-semi", "learning rate"), ("train-semi", "burn-in checkpoint")],
)
def test_other_configuration_starts_afresh_and_keeps_the_killed_scratch(stage, change, request, tmp_path):
    killed: Killed = request.getfixturevalue("killed_" + stage.replace("-", "_"))
    scratch = killed.copy_scratch(tmp_path / "scratch")
    kept = sorted(p.name for p in scratch.iterdir())
    if change == "learning rate":
        section = "burn_in" if stage == "burn-in" else "semi"
        params = yaml.safe_load(killed.params.read_text())
        args = killed.args(
            tmp_path / "out", scratch, write_params(tmp_path / "p.yaml", params, **{f"{section}__lr": 2e-3})
        )
    else:
        args = killed.args(tmp_path / "out", scratch, burn_in=_other_burn_in(killed.root, tmp_path))
    log = must_succeed(args)
    assert "resumed" not in log, log
    assert weights(tmp_path / "out" / "model.pt")["step"] == STEPS
    assert sorted(p.name for p in scratch.iterdir()) == kept, (
        "the killed run's scratch must stay for its resume"
    )


def _foreign_model(path: Path) -> None:
    """A checkpoint of another model configuration (tiny at 96 px) where the scratch one was."""
    from semires.model.build import prepare
    from semires.train import save_checkpoint
    from stages.burn_in import ModelParams, model_config

    spec, model = prepare(model_config(ModelParams(preset="tiny", image_size=96)), corpus=["the red circle"])
    save_checkpoint(path, spec=spec, model=model, step=CHECKPOINT_EVERY, run_key="x")


def _foreign_run(path: Path) -> None:
    obj = torch.load(path, weights_only=True)
    obj["run_key"] = "0" * 16
    torch.save(obj, path)


DAMAGED_SCRATCH = {
    "garbage": (lambda p: p.write_bytes(b"not a checkpoint\n"), "not a readable checkpoint", "delete it"),
    "truncated": (
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "not a readable checkpoint",
        "delete it",
    ),
    "another model": (_foreign_model, "written for another model configuration", "delete it"),
    "another run": (_foreign_run, "written by a run with other inputs", "delete it to start afresh"),
}


@pytest.mark.parametrize("damage", list(DAMAGED_SCRATCH))
def test_damaged_or_foreign_scratch_checkpoint_is_one_clear_error(killed, damage, tmp_path):
    scratch = killed.copy_scratch(tmp_path / "scratch")
    (last,) = scratch.glob("*/last.pt")
    spoil, what, fix = DAMAGED_SCRATCH[damage]
    spoil(last)
    out_dir = tmp_path / "out"
    res = invoke(killed.args(out_dir, scratch))
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"semires {killed.stage}: error: {last}: {what}"), lines[0]
    assert fix in lines[0]
    assert not out_dir.exists()
