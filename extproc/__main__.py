"""`python -m extproc` is the `spendgate` command."""

from extproc.cli import main

raise SystemExit(main())
