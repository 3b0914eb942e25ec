"""``python tools/make_shards.py ...`` is ``dist-cl-make-shards ...`` (dist_cl.cli.make_shards), kept for old
command lines."""

import sys

from dist_cl.cli.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
