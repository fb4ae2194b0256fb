from gpugate.cli import main

main()
