"""Show that a change leaves training bit for bit as it was.

    python3 tests/compare_commits.py BASE            # BASE (a commit) against the working tree
    python3 tests/compare_commits.py BASE OTHER      # two commits

Both sides run the same deterministic commands on the same tiny CIFAR-10
archive, on the CPU: the three-stage pipeline, then the distilled stage with
every method against the pipeline's teacher. The script then compares, per
checkpoint, a digest of every tensor of its weights, the test accuracies of
results.json and the per-epoch losses and validation accuracies of the logs,
and prints the verdict. Exit status 0 when everything is identical. A commit
is checked out with `git worktree add`, and removed afterwards.
"""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import FAST, write_cifar10  # noqa: E402

# without --no-compression-report, which a base older than the flag would refuse
TINY = [*(a for a in FAST if a != "--no-compression-report"), "--epochs", "2", "--deterministic"]
METHODS = ["kd", "dkd", "lskd", "fitnet", "at"]


def run(tree, data_dir, out_dir, *args):
    command = [
        sys.executable,
        str(Path(tree) / "train.py"),
        "--data-dir",
        str(data_dir),
        "--out-dir",
        str(out_dir),
        *TINY,
        *args,
    ]
    result = subprocess.run(command, cwd=tree, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")


def run_all(tree, data_dir, out_root):
    """Every command of the comparison, in `tree`; outputs under out_root/<run>/cifar10/."""
    run(tree, data_dir, out_root / "pipeline")
    for method in METHODS:
        folder = out_root / method / "cifar10"
        folder.mkdir(parents=True)
        shutil.copy(out_root / "pipeline" / "cifar10" / "teacher.pt", folder / "teacher.pt")
        run(tree, data_dir, out_root / method, "--stages", "distilled", "--method", method, "--dkd-warmup", "0")


def tensor_digest(state_dict):
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint(out_root):
    """run/stage -> (weights digest, test accuracy, [(loss, val_acc) per epoch])."""
    found = {}
    for checkpoint in sorted(out_root.glob("*/cifar10/*.pt")):
        run_name, stage = checkpoint.parent.parent.name, checkpoint.stem
        if run_name != "pipeline" and stage == "teacher":
            continue  # a copy of the pipeline's teacher
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        results = json.loads((checkpoint.parent / "results.json").read_text())
        results = results.get("stages", results)  # the layout since issue 13 nests the stages
        log = [json.loads(line) for line in checkpoint.with_suffix(".jsonl").read_text().splitlines()]
        found[f"{run_name}/{stage}"] = (
            tensor_digest(state["state_dict"]),
            results[stage]["test_acc"],
            [(r["loss"], r["val_acc"]) for r in log],
        )
    return found


def side(commit, data_dir, scratch):
    """The fingerprint of `commit` (None: the working tree), run in scratch."""
    tree = ROOT
    if commit is not None:
        tree = scratch / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit], cwd=ROOT, check=True)
    try:
        out_root = scratch / "out"
        run_all(tree, data_dir, out_root)
        return fingerprint(out_root)
    finally:
        if commit is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="the commit before the change")
    parser.add_argument("other", nargs="?", default=None, help="the commit after it (default: the working tree)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write_cifar10(scratch / "data", per_class_train=20, per_class_test=2)
        before = side(args.base, scratch / "data", scratch / "before")
        after = side(args.other, scratch / "data", scratch / "after")
    names = sorted(set(before) | set(after))
    print(f"{'checkpoint':<20} {args.base[:10]:<18} {(args.other or 'working tree')[:18]:<18} same")
    for name in names:
        a, b = before.get(name), after.get(name)
        print(f"{name:<20} {a[0] if a else '-':<18} {b[0] if b else '-':<18} {'yes' if a == b else 'NO'}")
    same = before == after
    print(
        f"\nverdict: {'identical' if same else 'DIFFERENT'}: weights, test accuracies and logs of "
        f"{len(names)} checkpoints"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
