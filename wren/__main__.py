"""`python -m wren` (and `torchrun -m wren`) run the command line."""

from wren.cli import main

raise SystemExit(main())
