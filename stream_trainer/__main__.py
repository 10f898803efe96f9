"""``python -m stream_trainer`` (also what ``torchrun -m stream_trainer`` runs)."""

import sys

from stream_trainer.cli import main

sys.exit(main())
