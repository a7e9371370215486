from raygen.cli import main

main()
