from knormctl.cli import main

main()
