import sys

from blockcopy.runtime.cli import main

sys.exit(main())
