"""pytest set-up: two threads (CI's cores); shared test code lives in helpers.py."""

import torch

torch.set_num_threads(min(2, torch.get_num_threads()))
