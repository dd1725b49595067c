"""Speed, memory and quality measurements; each prints the machine it ran on (benchmarks/machine.py)."""
