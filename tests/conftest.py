import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
# Tiny test models gain nothing from a second thread, and OpenMP barriers make every op much slower whenever the
# other core is busy.
torch.set_num_threads(1)
