from ._commands import main

main()
