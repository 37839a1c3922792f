import sys

from fastguide.cli import main

sys.exit(main())
