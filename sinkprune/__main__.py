import sys

from sinkprune.cli import main

sys.exit(main())
