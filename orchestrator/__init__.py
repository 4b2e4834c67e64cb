"""Ray side of Sputnik: CLI, config loading, placement, actors, drivers, tracking, checkpoints.

The only package that imports Ray. `sputnik --help` lists the commands.
"""
