from nbdserve.cli import main

main()
