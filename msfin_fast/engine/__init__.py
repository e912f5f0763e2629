"""The fast engine: the reference network's graph executed as fused kernel launches.

Backends implement the same per-layer contract (NHWC activations, deferred channel attention);
see ``plan`` for how a forward is laid out and ``runtime`` for how it runs.
"""
