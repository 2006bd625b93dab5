"""The fast path: the MLP policy's rollout and loss in numpy on the CPU (core.py), with the numpy twins of the
action heads (heads.py) and of the network input (observations.py). The maths is defined once, in torch, by the
policy's modules; this package mirrors it, reaches nothing private, and refuses (core.covers, one line) every
policy, head or observation part it does not mirror. tests/test_fastpath.py checks it against autograd."""
