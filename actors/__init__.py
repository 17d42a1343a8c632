"""The actor role: vectorized Mario envs, batched inference, per-actor ε, n-step adder."""
