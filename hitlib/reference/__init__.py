"""The NumPy reference: every piece of HiT written for correctness first, each checked
against naive loops, and the oracle every JAX module is tested against (the "a"
chapters: 1a, 2a, 3a, 4a, 5a, 7a, 9a, 10a, 12a)."""
