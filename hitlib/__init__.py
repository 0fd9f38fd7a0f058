"""hitlib: HiT, the Transformer GAN generator of "Improved Transformer for
High-Resolution GANs" (Zhao et al., NeurIPS 2021), as the book's chapters export it.

Each module is one chapter's code: `reference/` holds the NumPy oracles (the "a"
chapters), the modules beside it their JAX and Flax NNX twins and the training,
evaluation and command line built on them. A module's docstring names its chapter.
"""
