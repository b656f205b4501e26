"""Job entry point: embed an image table with a model (raybackfill embed ...).

    ray job submit --working-dir . -- python jobs/embed.py ARGS...

takes exactly the arguments of `raybackfill embed` (see `python jobs/embed.py --help`). Under
`ray job submit` RAY_ADDRESS is set, so the job joins the cluster it was submitted to.
"""

import sys

from raybackfill.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
