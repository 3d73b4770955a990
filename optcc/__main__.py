from optcc.cli import main

main()
