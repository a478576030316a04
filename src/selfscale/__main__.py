"""``python -m selfscale`` runs the command-line interface."""

from selfscale.cli import main

raise SystemExit(main())
