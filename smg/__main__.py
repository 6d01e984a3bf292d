from smg.cli import main

main()
