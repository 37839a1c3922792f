"""torch thread-count helpers."""
import contextlib

import torch


@contextlib.contextmanager
def torch_threads(count):
    """Runs the block with `count` torch threads, then restores the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
