"""A pickle that would run code when unpickled, for the tests that feed loaders hostile files."""

import os
import pickle


class RunsCode:
    """Unpickling this calls os.mkdir(marker): the sentinel of code execution.

    Pickle it inside whatever container a test needs (torch.save, an object array in an .npz);
    the test then asserts that `marker` does not exist.
    """

    def __init__(self, marker: str | os.PathLike):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def code_running_pickle(marker: str | os.PathLike) -> bytes:
    """pickle.dumps of a state-dict-like {"cls_token": RunsCode(marker)}."""
    return pickle.dumps({"cls_token": RunsCode(marker)})
