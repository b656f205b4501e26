"""Job entry point: make, import or split the data (raybackfill data ...).

    ray job submit --working-dir . -- python jobs/prepare_data.py ARGS...

takes exactly the arguments of `raybackfill data` (see `python jobs/prepare_data.py --help`). Under
`ray job submit` RAY_ADDRESS is set, so the job joins the cluster it was submitted to.
"""

import sys

from raybackfill.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["data", *sys.argv[1:]]))
