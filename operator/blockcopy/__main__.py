import sys

from blockcopy.cli import main

sys.exit(main())
