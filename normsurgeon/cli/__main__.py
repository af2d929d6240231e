"""``python -m normsurgeon.cli ...`` (and ``accelerate launch -m normsurgeon.cli ...``): the console script."""
import sys

from normsurgeon.cli.application import main

sys.exit(main())
