"""``python -m pipeline``: the same command line as ``run.py`` (``--settings``,
``--check``, ``--graph``, ``--set``, ``--list``, ``--describe``); ``-m`` puts the
current directory on the import path, so ``type = "mymodule:MyHandler"`` finds
modules there."""
import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
