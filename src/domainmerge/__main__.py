"""`python -m domainmerge` is the same as the `domainmerge` command."""

import sys

from domainmerge.cli import main

sys.exit(main())
