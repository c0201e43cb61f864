import sys

from bench.phases import main

sys.exit(main())
