import sys

from reid_deploy.cli import main

sys.exit(main())
