"""The commands: each module is one thin `main(argv)` of `unmask <command>`."""
