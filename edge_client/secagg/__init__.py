"""Secure aggregation, SecAgg+-style (Bell et al., 2020): the coordinator learns only the sum of a round's updates.

:mod:`.shamir` (t-of-n secret sharing over a prime field), :mod:`.masking` (fixed-point quantisation mod 2^32 and
the ChaCha20 PRG), :mod:`.protocol` (the device's and the server's state machines, no I/O), :mod:`.graph` (the sparse
neighbour graph). The transport (MQTT messages) lives in edge_client.wire and coordinator.fleet.secagg.
"""
