"""`python -m nbdserve`: the same command line as the `nbdserve` script."""

from nbdserve.cli import main

main()
