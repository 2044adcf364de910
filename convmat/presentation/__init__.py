"""The presentation: symbolic W, pictures, the guided tour and the ``convmat`` command. May use
every package below it; nothing imports it but the command's entry points."""
