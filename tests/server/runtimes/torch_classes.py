"""Model classes the torch tests script, export and name by import path."""

from __future__ import annotations

import torch


class TinyMLP(torch.nn.Module):
    def __init__(self, n_in: int = 4, hidden: int = 16, n_out: int = 3) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(n_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, n_out)
        self.register_buffer("scale", torch.full((n_out,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) * self.scale
