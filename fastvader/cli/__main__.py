import sys

from fastvader.cli.app import main

sys.exit(main())
