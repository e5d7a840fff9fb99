from osdiff.cli import main

main()
