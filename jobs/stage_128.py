#!/usr/bin/env python
"""Ray job: the stage whose top resolution is 128 (default model: 64-128).

    ray job submit --working-dir . -- python jobs/stage_128.py --set data.shards=s3://bucket/shards

Grows the registered previous stage when the model nests more than one resolution, trains
with Ray Train + DeepSpeed ZeRO, logs to MLflow and registers models:/mdm@stage-128.
`--help` lists the options; `--print_config` every field of the stage config.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.stage import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], resolution=128, default_model="64-128"))
