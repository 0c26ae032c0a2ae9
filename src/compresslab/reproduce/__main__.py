import sys

from compresslab.reproduce import main

sys.exit(main())
