import sys

from aios_ray.cli import main

sys.exit(main())
