import sys

from kd_ddp.cli import main

sys.exit(main())
