"""``dsgd`` under torchrun, with one more ``--set`` (argv[1]) on rank 1 only: a job whose
processes were started with different configs."""

import os
import sys

from dsgd.experiments.cli import main

if __name__ == "__main__":
    extra, args = sys.argv[1], sys.argv[2:]
    if os.environ.get("RANK") == "1":
        args += ["--set", extra]
    sys.exit(main(args))
