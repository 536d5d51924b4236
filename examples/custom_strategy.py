"""A grow strategy of your own: registered, then trained through fit() (docs/strategies.md).

    python examples/custom_strategy.py [RUN_FOLDER]
    synthprune train --strategies examples/custom_strategy.py --grow strong_inputs \
        --grow-option temperature=0.5 --preset digits-mlp --out runs/strong-inputs
"""

import sys
import tempfile

import torch

from synthprune.config import load_config
from synthprune.strategies import GrowContext, input_strength, register_grow
from synthprune.topology import multinomial_with_replacement
from synthprune.train import fit


@register_grow("strong_inputs")
def grow_from_strong_inputs(ctx: GrowContext, count: int, *, temperature: float = 1.0):
    """Start nodes drawn with probability ∝ strength^(1/temperature), endpoints uniform.

    A proposer only proposes: ``propose(n, generator)`` returns ``n`` candidate keys
    ``output * n_in + input``, best first. The Rewirer skips taken slots and repeats, falls back
    to uniform after a few rounds, and checks the exact count (docs/strategies.md)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    weights = (input_strength(ctx).float().clamp_min(1e-12) ** (1.0 / temperature)).float()

    def propose(n: int, generator: torch.Generator) -> torch.Tensor:
        starts = multinomial_with_replacement(weights, n, generator)
        ends = torch.randint(0, ctx.n_out, (n,), generator=generator)
        return ends * ctx.n_in + starts

    return propose


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="strong-inputs-")
    config = load_config("digits-mlp", grow="strong_inputs", grow_options={"temperature": 0.5}, epochs=5)
    summary = fit(config, out, log=lambda line: None)
    print(f"strong_inputs: test accuracy {summary['final_test_accuracy']:.3f}, "
          f"{summary['connections']:,} connections, run in {out}")
