import sys

from vpns_fast.cli import main

sys.exit(main())
