import sys

from teepsi.cli import main

sys.exit(main())
