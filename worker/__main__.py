"""`python -m worker` is `ias`."""

from worker.cli import main

main()
