"""train.py under torchrun, recording the weights each process ends every stage with.

    torchrun --nproc-per-node 2 tests/ddp_replicas.py DIGEST_DIR [train.py flags]

Writes DIGEST_DIR/rank<RANK>.json: a digest of the trained network of each
stage, as this process holds it at the end. DDP must keep every process's
copy identical; test_distributed compares the files. Run it with
--val-size 0, so that the master keeps the last epoch's weights as the others do.
"""

import hashlib
import json
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import distill  # noqa: E402

built = []
build_objective = distill.build_objective


def recording_build_objective(*args, **kwargs):
    objective = build_objective(*args, **kwargs)
    built.append(objective)
    return objective


distill.build_objective = recording_build_objective  # train.py calls it through the module
digest_dir = Path(sys.argv[1])
sys.argv = [str(ROOT / "train.py"), *sys.argv[2:]]
try:
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
finally:
    digests = [
        hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in objective.model.parameters())).hexdigest()
        for objective in built
    ]
    (digest_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps(digests))
