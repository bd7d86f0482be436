from stcli.jobs.cli import main

main()
