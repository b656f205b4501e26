"""Job entry point: a paired sample of a gallery, embedded by the old and the new encoder (raybackfill sample ...).

    ray job submit --working-dir . -- python jobs/sample.py ARGS...

takes exactly the arguments of `raybackfill sample` (see `python jobs/sample.py --help`). Under
`ray job submit` RAY_ADDRESS is set, so the job joins the cluster it was submitted to.
"""

import sys

from raybackfill.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
