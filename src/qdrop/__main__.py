"""`python -m qdrop ...` (and `torchrun --nproc-per-node N -m qdrop quantize ...`): the command line."""
import sys

from .cli import main

sys.exit(main())
