import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI runs derandomized so a failure reproduces; locally hypothesis explores new examples.
settings.register_profile(
    "default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", deadline=None, max_examples=25, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else "default")

# Two threads at most: the tests must behave the same on a 2-core CI machine.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(params=["csr", "masked"])
def backend(request) -> str:
    return request.param
