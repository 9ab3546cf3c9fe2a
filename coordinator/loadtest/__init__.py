"""The fleet load harness (`fedge loadtest`, benchmarks/fleet_scale.py): emulated devices speaking the full
protocol, many per process, against a real broker and a real `fedge serve`."""
