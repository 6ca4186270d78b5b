"""Fixtures for the layer tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True)`` (errors, not warnings) for one test, restored afterwards."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
