"""The `raybackfill` command line: each subcommand parses arguments and calls one library function."""
