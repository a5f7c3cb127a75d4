import sys

try:
    from wse_sim.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python loads the command line
    print("interrupted: no file written", file=sys.stderr)
    sys.exit(130)  # wse_sim.cli.INTERRUPTED

sys.exit(main())
