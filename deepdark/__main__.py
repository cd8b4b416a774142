import sys

from deepdark.cli import main

sys.exit(main())
