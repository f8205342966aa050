import sys

from dndtrain.cli import main

sys.exit(main())
