import sys

from flexgen_graph.cli import main

sys.exit(main())
