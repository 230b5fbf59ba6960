from lamina.cli._app import main

main()
