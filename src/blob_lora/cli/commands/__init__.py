"""Sub-commands: each module here registers its commands with ``blob_lora.cli.registry.command``.

Modules are discovered at start-up, so adding a command means adding a module.
"""
