"""Train burn-in under several params variants side by side and tabulate what each reaches.

    python scripts/sweep.py --out /tmp/sweep --jobs 4 [--threads 2] [--device cpu|cuda] \\
        [--fraction 100] [--budget-s 600] [--params params.yaml] \\
        --variant base \\
        --variant long burn_in.steps=3000 \\
        --variant more_data synth.num_images=1200

Each ``--variant NAME KEY=VALUE ...`` is params.yaml with those keys replaced (values are
YAML: ``model.depths=[1,1,2,1]``; the stages reject a key they do not know). Variants that share their
``synth`` / ``dataset`` / ``split`` sections share one prepared dataset (the ``synth``,
``extract`` and ``split`` stages run once for it under ``--out``). Each variant then runs
``semires burn-in`` on the ``--fraction`` split in its own process (``--jobs`` at once,
``--threads`` CPU threads each; ``--device cpu`` hides any GPU), and the final model is
scored on up to ``--fit-samples`` train expressions as well, so the table shows whether
a variant under-fits (train and val low) or over-fits (train high, val low).

This is how the embedded default's sizes were chosen. It is a tool, not a DVC stage: for
tracked experiments use ``dvc exp run -S key=value``. The last lines printed are a markdown
table; ``--out``/sweep.json holds every figure. Variants still queued when ``--budget-s``
runs out are skipped and running ones are stopped (reported as such). Exit status: 0 when
every variant finished, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repository may be copied, not installed (a GPU machine)
    sys.path.insert(0, str(ROOT))

DATA_SECTIONS = ("synth", "dataset", "split")


def parse_variant(spec: list[str], base: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``[NAME, KEY=VALUE, ...]`` -> (name, overrides, the full params)."""
    name, *pairs = spec
    params, overrides = copy.deepcopy(base), {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"sweep: variant {name}: {pair!r} is not KEY=VALUE")
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise SystemExit(f"sweep: variant {name}: params has no section {key.rsplit('.', 1)[0]!r}")
        value = yaml.safe_load(raw)
        if isinstance(value, str):  # YAML 1.1 reads 2e-3 as a string
            with contextlib.suppress(ValueError):
                value = float(raw)
        node[leaf] = overrides[key] = value
    return name, overrides, params


def data_key(params: dict[str, Any]) -> str:
    blob = json.dumps({k: params.get(k) for k in DATA_SECTIONS}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def semires(args: list[str], log: Path, env: dict[str, str], proc_box: dict | None = None) -> int:
    """One ``semires`` command, output appended to ``log``; the process goes in ``proc_box``."""
    with log.open("a") as f:
        f.write(f"$ semires {' '.join(args)}\n")
        f.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "stages.cli", *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT
        )
        if proc_box is not None:
            proc_box["proc"] = proc
        return proc.wait()


def prepare_data(params: dict[str, Any], directory: Path, env: dict[str, str]) -> dict[str, Any]:
    """synth (for the synthetic dataset), extract and split into ``directory``; the params
    with dataset paths pointing there."""
    params = copy.deepcopy(params)
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "log.txt"
    if params["dataset"]["name"] == "synthref":
        params["dataset"]["refer_root"] = str(directory / "refer")
        params["dataset"]["image_dir"] = str(directory / "refer" / "images" / "synthref")
    pfile = directory / "params.yaml"
    pfile.write_text(yaml.safe_dump(params, sort_keys=False))
    common = ["--params", str(pfile)]
    steps = [["extract", "--out", str(directory / "anns.json"), "--images", str(directory / "train.json")]]
    steps.append(["split", "--anns", str(directory / "anns.json"), "--out", str(directory / "split")])
    steps[-1] += ["--summary", str(directory / "split_summary.json")]
    if params["dataset"]["name"] == "synthref":
        steps.insert(0, ["synth", "--out", str(directory / "refer")])
    for step in steps:
        if semires(step + common, log, env) != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            raise RuntimeError(f"{step[0]} failed; the end of {log}:\n{tail}")
    return params


def score(checkpoint: Path, anns_path: Path, image_dir: str, samples: int) -> dict[str, Any]:
    """The checkpoint's own val figures and its mIoU / oIoU on up to ``samples`` train expressions."""
    import torch

    from semires import annotations
    from semires.data import ExpressionDataset
    from semires.train import evaluate, load_model

    spec, model, ckpt = load_model(checkpoint)
    refs = annotations.load(anns_path).in_split("train")
    size, tokens = spec.config.image_size, spec.config.max_tokens
    ds = ExpressionDataset(refs, image_dir, spec.make_tokenizer(), image_size=size, max_tokens=tokens)
    n = min(samples, len(ds))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
    fit = evaluate(model, torch.utils.data.Subset(ds, idx), device=torch.device("cpu"), batch_size=32)
    out = {k: v for k, v in ckpt.meta.items() if k.startswith("val/")}
    out.update({"train/mIoU": fit.metrics["mIoU"], "train/oIoU": fit.metrics["oIoU"], "train/count": n})
    return out


def val_curve(live: Path) -> list[tuple[int, float]]:
    tsv = live / "plots" / "metrics" / "val" / "mIoU.tsv"
    if not tsv.is_file():
        return []
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line.strip()]
    return [(int(r[0]), float(r[1])) for r in rows]


def exit_status(results: dict[str, dict[str, Any]]) -> int:
    """0 when every variant trained and was scored, else 1."""
    return 0 if all(r["status"] == "done" for r in results.values()) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--fraction", default="100", help="which split file's labeled images (percent)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu hides any GPU")
    ap.add_argument("--fit-samples", type=int, default=512)
    ap.add_argument("--budget-s", type=float, default=float("inf"))
    args = ap.parse_args(argv)

    deadline = time.monotonic() + args.budget_s
    base = yaml.safe_load(args.params.read_text())
    variants = [parse_variant(v, base) for v in args.variant]
    names = [v[0] for v in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"sweep: variant names repeat: {names}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. one dataset per distinct synth / dataset / split sections
    keys = {data_key(p) for _, _, p in variants}
    first = {k: next(p for _, _, p in variants if data_key(p) == k) for k in sorted(keys)}
    with ThreadPoolExecutor(max(1, min(args.jobs, len(first)))) as pool:
        futures = {k: pool.submit(prepare_data, p, args.out / f"data-{k}", env) for k, p in first.items()}
        prepared = {k: f.result() for k, f in futures.items()}

    # 2. burn-in per variant, --jobs at a time
    results: dict[str, dict[str, Any]] = {}
    running: list[dict] = []
    lock = threading.Lock()

    def run(name: str, overrides: dict[str, Any], params: dict[str, Any]) -> None:
        row: dict[str, Any] = {"overrides": overrides, "status": "skipped (budget)"}
        results[name] = row
        if time.monotonic() > deadline:
            return
        k = data_key(params)
        data_dir = args.out / f"data-{k}"
        params = copy.deepcopy(params)
        params["dataset"] = prepared[k]["dataset"]
        vdir = args.out / name
        vdir.mkdir(parents=True, exist_ok=True)
        pfile = vdir / "params.yaml"
        pfile.write_text(yaml.safe_dump(params, sort_keys=False))
        box: dict = {}
        with lock:
            running.append(box)
        t0 = time.monotonic()
        rc = semires(
            ["burn-in", "--split", str(data_dir / "split" / f"{args.fraction}.json"),
             "--anns", str(data_dir / "anns.json"), "--out", str(vdir / "model.pt"),
             "--live", str(vdir / "dvclive"), "--scratch", str(vdir / "scratch"), "--params", str(pfile)],
            vdir / "log.txt", env, box,
        )  # fmt: skip
        with lock:
            running.remove(box)
        row["seconds"] = round(time.monotonic() - t0, 1)
        row["val_curve"] = val_curve(vdir / "dvclive")
        if rc != 0:
            row["status"] = "stopped (budget)" if time.monotonic() > deadline else f"failed (exit {rc})"
            return
        image_dir = params["dataset"]["image_dir"]
        row.update(score(vdir / "model.pt", data_dir / "anns.json", image_dir, args.fit_samples))
        row["status"] = "done"

    def watchdog() -> None:
        while not stop.wait(1.0):
            if time.monotonic() > deadline:
                with lock:
                    for box in running:
                        if "proc" in box:
                            box["proc"].kill()

    stop = threading.Event()
    threading.Thread(target=watchdog, daemon=True).start()
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for f in [pool.submit(run, *v) for v in variants]:
            f.result()
    stop.set()

    (args.out / "sweep.json").write_text(json.dumps(results, indent=1))
    print(f"\nburn-in on the {args.fraction} % split; train = up to {args.fit_samples} train expressions")
    print("| variant | overrides | val mIoU | val oIoU | train mIoU | val mIoU by step | s | status |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        r = results[name]
        over = " ".join(f"{k}={json.dumps(v)}" for k, v in r["overrides"].items()) or "(params file)"
        curve = " ".join(f"{s}:{v:.1f}" for s, v in r.get("val_curve", []))

        def fmt(key: str, r=r) -> str:
            return f"{r[key]:.2f}" if key in r else "-"

        print(
            f"| {name} | {over} | {fmt('val/mIoU')} | {fmt('val/oIoU')} | {fmt('train/mIoU')} | {curve} | "
            f"{r.get('seconds', '-')} | {r['status']} |"
        )
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
