import sys

from wse_sim.cli import main

sys.exit(main())
