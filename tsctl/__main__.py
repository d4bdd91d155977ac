from tsctl.main import main

main()
