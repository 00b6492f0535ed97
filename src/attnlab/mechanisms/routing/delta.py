"""Delta attention [D99]: correct any sparse attention output toward dense attention, cheaply.

Sparse attention shifts the distribution of the outputs. The correction computes *dense* attention for a
strided subset of the queries only (every ``stride``-th row: ``Tq / stride`` rows over all keys), takes the
difference to the sparse output on those rows, and adds each sampled row's difference to the ``stride``
queries of its group (row ``i`` uses the sample at ``stride * floor(i / stride)``, which is at or before
``i``, so causality holds; positions are absolute, so decoding with a cache samples the same rows).
Output ``= sparse + repeat(dense[sampled] - sparse[sampled])``; with ``stride = 1`` it is dense attention
exactly. The cost added to the sparse method is ``Tq * Tk / stride`` pairs.

The functions live with the op registry (:mod:`attnlab.ops.sparse`), where every sparse op takes the correction as
its ``delta`` option; they are re-exported here.
"""

from attnlab.ops.sparse import correction_terms, delta_correction, delta_reference, sampled_dense

__all__ = ["correction_terms", "delta_correction", "delta_reference", "sampled_dense"]
