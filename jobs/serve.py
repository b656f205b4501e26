"""Job entry point: start the serving index over old embeddings (raybackfill serve ...), and with ``--http`` the
HTTP search service in front of it.

    ray job submit --working-dir . -- python jobs/serve.py ARGS...
    ray job submit --working-dir . -- python jobs/serve.py --http --new-model s3://bucket/models/new

takes exactly the arguments of `raybackfill serve` (see `python jobs/serve.py --help`). Under
`ray job submit` RAY_ADDRESS is set, so the job joins the cluster it was submitted to.
"""

import sys

from raybackfill.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
