"""Entry point of ``python -m bnjax.bench`` (see :mod:`bnjax.bench.cli`)."""

from bnjax.bench.cli import main

raise SystemExit(main())
