from ocula.cli import main

main()
