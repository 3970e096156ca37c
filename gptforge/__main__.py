from gptforge.cli import main

main()
