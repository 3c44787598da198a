"""``python -m moekit`` = the ``moekit`` command."""

import sys

from moekit.cli import main

sys.exit(main())
