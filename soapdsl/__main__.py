import sys

from soapdsl.cli import main

sys.exit(main())
