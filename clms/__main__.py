from clms.cli import main

main()
