import sys

from igdit.bench.core import main

sys.exit(main())
