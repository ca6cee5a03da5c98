import sys

from fastsgd.study.cli import main

sys.exit(main())
