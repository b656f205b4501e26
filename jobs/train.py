"""Job entry point: train a model on Ray Train (raybackfill train ...).

    ray job submit --working-dir . -- python jobs/train.py ARGS...

takes exactly the arguments of `raybackfill train` (see `python jobs/train.py --help`). Under
`ray job submit` RAY_ADDRESS is set, so the job joins the cluster it was submitted to.
"""

import sys

from raybackfill.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
