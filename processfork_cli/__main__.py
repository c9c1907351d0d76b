"""`python -m processfork_cli` runs `pf`."""

from processfork_cli.main import main

if __name__ == "__main__":
    main()
