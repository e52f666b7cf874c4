import sys

from flexgen_graph.app.cli import main

sys.exit(main())
