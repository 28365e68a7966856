"""Entry point of the `igdit` command (``python -m igdit.cli`` under torchrun); see igdit/commands/."""
import sys

from igdit.commands import main

if __name__ == "__main__":
    sys.exit(main())
