import sys

from dkuxnet.cli import main

sys.exit(main())
