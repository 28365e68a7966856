"""``python -m igdit``: the `igdit` command."""
import sys

from igdit.commands import main

if __name__ == "__main__":
    sys.exit(main())
