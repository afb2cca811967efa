"""Tolerances for comparing float32 results that differ only in summation order, derived from the arithmetic
rather than from what one machine printed.

Two float32 evaluations of the same network (another batch composition, AVX2 against AVX-512 kernels, another
runtime) differ by rounding only. With unit roundoff u = 2**-24 (6.0e-8), one dot product of K terms summed in
another order moves by about sqrt(K) * u relative to the sum of its terms' magnitudes (K * u at the very worst),
which in these normalised networks (BatchNorm after every convolution) is of the order of the outputs' scale.
The widest reductions here are K = 512 * 3 * 3 = 4608 (the encoder's 256->512 and the generator's 512-channel
3x3 convolutions), so sqrt(K) * u = 4.1e-6 per layer; over the generator's ~40 layers the errors add up like a
random walk (sqrt(40) = 6.3): 2.6e-5 relative to the output scale. REORDER_RTOL keeps a 4x margin over that.
"""
REORDER_RTOL = 1e-4


def reorder_atol(scale: float) -> float:
    """Absolute tolerance for values of magnitude up to `scale` (at least 1: sigmoid outputs, mel levels)."""
    return REORDER_RTOL * max(1.0, float(scale))
