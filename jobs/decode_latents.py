"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/decode_latents.py JOB.yaml`.

The same as `pid-batch run JOB.yaml`: exit code 0 when every sample is ok, 1 when some samples
ended as error rows (see summary.json), 2 on a config error (one line; nothing was started).
`pid-batch submit` runs this file with the spec and the directory it packaged.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.getcwd())  # the packaged working directory (Ray adds it too)

from pid_batch.cli import entry  # noqa: E402

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "run", *sys.argv[1:]]
    entry()
