"""`python -m gpugate.sim`: run the simulator."""

from gpugate.sim.cli import main

main()
