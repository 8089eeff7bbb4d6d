import sys

from dsgd.experiments.cli import main

sys.exit(main())
