"""Allow ``python -m fermoposta``; same as the ``fermoposta`` console script."""

from fermoposta.cli import main

raise SystemExit(main())
