"""The test model of the cache's forecasting tests: one call is one sampling step, and its cached child
``branch`` returns a known trajectory ``f(t)`` of the step (a polynomial, a smooth random curve), so every
forecast can be checked against a closed form."""

import torch


class StepFeature(torch.nn.Module):
    """Root model; its child ``branch`` returns ``f(t)`` with ``t`` read from the input (one call = one step).

    The input ``x`` (zeros in the tests) is added times 0 so outputs follow its device; ``branch.steps``
    records the steps the branch really computed (``len(branch.steps)``: how often it ran)."""

    def __init__(self, f):
        super().__init__()
        self.branch = _Branch(f)

    def forward(self, x, t):
        return self.branch(x, t)


class _Branch(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f, self.steps = f, []

    def forward(self, x, t):
        self.steps.append(int(t))
        return x * 0 + self.f(float(t))
