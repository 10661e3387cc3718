"""``python -m bench`` runs the benchmark command line."""

from bench.cli import main

raise SystemExit(main())
